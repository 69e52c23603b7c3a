"""Turning inputs into batches of (x, y-or-None, global start index).

Inputs are a sample batch of :mod:`dntk.samples` (a tensor [n, ...], a tuple or a dict of tensors
[n, ...]), a Dataset or a DataLoader. A Dataset item or loader batch is ``x``, ``(x, y)`` — x itself a
tensor, a tuple/list of tensors (positional inputs) or a dict of tensors (keyword inputs) — or a dict
holding the inputs and a ``label``/``labels`` (or ``y``) entry, as Hugging Face datasets yield them.
"""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from .. import samples
from ..errors import DNTKError

# how a Dataset item or loader batch is read is the samples module's (the data layer reads it too)
LABEL_KEYS, split_item = samples.LABEL_KEYS, samples.split_item


def num_inputs(inputs) -> int | None:
    if samples.is_batch(inputs):
        return samples.count(inputs)
    if isinstance(inputs, DataLoader):
        try:
            return len(inputs.dataset)
        except TypeError:
            return None
    try:
        return len(inputs)
    except TypeError:
        return None


def iter_batches(inputs, batch_size: int, device: torch.device, strict_device: bool) -> Iterator[tuple]:
    """Yield (x on device — the inputs' form, B samples —, y [B] or None, start index)."""
    if isinstance(inputs, (dict, tuple)) and not samples.is_batch(inputs):
        samples.count(inputs)  # names what is wrong with a dict or tuple input
    n = num_inputs(inputs)
    if n == 0:
        raise DNTKError("the input is empty (0 samples); pass at least one input")
    if samples.is_batch(inputs):
        if strict_device:
            for t in samples.leaves(inputs):
                if t.device != device:
                    raise DNTKError(f"inputs are on {t.device} but the model is on {device}; move them with "
                                    f"inputs.to('{device}') or pass device='{t.device}' to move the model")
        for start in range(0, n, batch_size):
            yield samples.to(samples.take(inputs, slice(start, start + batch_size)), device), None, start
        return
    if isinstance(inputs, DataLoader):
        loader = inputs
    elif isinstance(inputs, Dataset) or hasattr(inputs, "__getitem__"):
        loader = DataLoader(inputs, batch_size=batch_size, shuffle=False)
    else:
        raise DNTKError(f"inputs must be a tensor, a tuple or dict of tensors, a Dataset or a DataLoader, got "
                        f"{type(inputs).__name__}")
    start = 0
    seen = False
    for batch in loader:
        x, y = split_item(batch)
        B = samples.count(x)
        if B == 0:
            continue
        seen = True
        yield samples.to(x, device), y, start
        start += B
    if not seen:
        raise DNTKError("the input is empty (the loader yielded no samples); pass at least one input")
