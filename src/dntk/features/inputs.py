"""Turning a tensor, a Dataset or a DataLoader into batches of (x, y-or-None, global indices)."""

from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DNTKError


def _split_item(batch):
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], torch.Tensor):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0], y
    if isinstance(batch, dict) and "x" in batch:
        return batch["x"], batch.get("y")
    raise DNTKError(f"cannot read inputs from a batch of type {type(batch).__name__}; yield tensors or (x, y) pairs")


def num_inputs(inputs) -> int | None:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0] if inputs.dim() > 0 else 0
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
    """Yield (x [B, ...] on device, y [B] or None, start index)."""
    n = num_inputs(inputs)
    if n == 0:
        raise DNTKError("the input is empty (0 samples); pass at least one input")
    if isinstance(inputs, torch.Tensor):
        if strict_device and inputs.device != device:
            raise DNTKError(f"inputs are on {inputs.device} but the model is on {device}; move them with "
                            f"inputs.to('{device}') or pass device='{inputs.device}' to move the model")
        for start in range(0, inputs.shape[0], batch_size):
            yield inputs[start : start + batch_size].to(device), None, start
        return
    if isinstance(inputs, DataLoader):
        loader = inputs
    elif isinstance(inputs, Dataset) or hasattr(inputs, "__getitem__"):
        loader = DataLoader(inputs, batch_size=batch_size, shuffle=False)
    else:
        raise DNTKError(f"inputs must be a tensor, a Dataset or a DataLoader, got {type(inputs).__name__}")
    start = 0
    seen = False
    for batch in loader:
        x, y = _split_item(batch)
        if x.shape[0] == 0:
            continue
        seen = True
        yield x.to(device), y, start
        start += x.shape[0]
    if not seen:
        raise DNTKError("the input is empty (the loader yielded no samples); pass at least one input")
