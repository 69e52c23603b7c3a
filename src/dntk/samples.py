"""Inputs that are not one float tensor: n samples as a tensor, a tuple or a dict of tensors.

A *sample batch* ``x`` is one of

- a tensor ``[n, ...]`` (images, token ids, anything) — the model is called as ``model(x)``;
- a tuple of tensors, each ``[n, ...]`` — passed positionally, ``model(*x)``;
- a dict ``{name: tensor [n, ...]}`` — passed as keyword arguments, ``model(**x)``, as Hugging Face
  models take ``input_ids`` / ``attention_mask`` / ``token_type_ids``;
- a :class:`PaddedTokens` dict — token sequences padded at the end, whose batches are cut to their
  longest sequence when they are taken (so a batch never carries more padding than it needs).

Every entry shares the sample axis 0; integer entries (token ids, masks) are data, never
differentiated. These functions are the one place that knows the forms: the engine, the feature
store, the training loop, stage 1 and the pipeline call them instead of ``x[i]`` or ``model(x)``.
A model's output may be the logits tensor ``[B, C]`` or an object with a ``.logits`` tensor (Hugging
Face ``ModelOutput``) or a dict with key ``"logits"``: :func:`logits_of` takes the logits from it.
"""

from __future__ import annotations

import torch

from .errors import DNTKError


class PaddedTokens(dict):
    """A dict of token tensors ``[n, L, ...]`` padded at the end: ``mask_key`` (``attention_mask``, int or
    bool ``[n, L]``, 1 on real tokens) says which positions are real. Taking samples (:func:`take`) keeps
    only the first L_b positions of the *sequence entries* — ``seq_keys`` (default: ``input_ids``,
    ``attention_mask``, ``token_type_ids``, ``position_ids``, ``special_tokens_mask``), which must have the
    length axis 1 — where L_b is the position after the last real token of any taken sample: "pad to
    the longest sequence of the batch". Every other entry is taken as it is, whatever its shape."""

    mask_key = "attention_mask"
    SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "special_tokens_mask")

    def __init__(self, data=(), seq_keys=None):
        super().__init__(data)
        self.seq_keys = tuple(seq_keys) if seq_keys is not None else tuple(k for k in self.SEQUENCE_KEYS if k in self)
        mask = self.get(self.mask_key)
        if mask is None or mask.dim() != 2:
            raise DNTKError(f"PaddedTokens needs {self.mask_key!r} [n, L] (1 on real tokens) to know the padding")
        L = mask.shape[1]
        bad = [k for k in self.seq_keys if k not in self or self[k].dim() < 2 or self[k].shape[1] != L]
        if bad:
            raise DNTKError(f"PaddedTokens: sequence entries {bad} are missing or lack the length axis 1 of "
                            f"{self.mask_key} ({L})")

    def like(self, data) -> "PaddedTokens":
        return PaddedTokens(data, self.seq_keys)

    def trimmed(self) -> "PaddedTokens":
        mask = self[self.mask_key]
        L = mask.shape[1]
        used = torch.nonzero(mask.bool().any(0)).flatten()
        keep = int(used.max()) + 1 if used.numel() else 1
        if keep == L:
            return self
        return self.like({k: (v[:, :keep] if k in self.seq_keys else v) for k, v in self.items()})


def is_batch(x) -> bool:
    """x is a tensor, or a non-empty tuple/dict whose values are all tensors."""
    if isinstance(x, torch.Tensor):
        return True
    if isinstance(x, tuple) and x:
        return all(isinstance(v, torch.Tensor) for v in x)
    if isinstance(x, dict) and x:
        return all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in x.items())
    return False


def leaves(x) -> list[torch.Tensor]:
    """The tensors of a sample batch, in order (dict: insertion order)."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, tuple):
        return list(x)
    if isinstance(x, dict):
        return list(x.values())
    raise DNTKError(f"inputs must be a tensor, a tuple of tensors or a dict of tensors, got {type(x).__name__}")


def _check(x, what: str = "inputs"):
    if not is_batch(x):
        if isinstance(x, dict):
            bad = [k for k, v in x.items() if not isinstance(v, torch.Tensor)]
            raise DNTKError(f"{what}: dict entries {bad[:5]} are not tensors; every entry of a dict input must be a "
                            "tensor [n, ...] (drop the others, e.g. strings, before passing it)")
        raise DNTKError(f"{what} must be a tensor, a tuple of tensors or a dict of tensors, got {type(x).__name__}")


def count(x, what: str = "inputs") -> int:
    """The number of samples n: dim 0 of every entry (all entries must agree)."""
    _check(x, what)
    sizes = []
    for t in leaves(x):
        if t.dim() == 0:
            raise DNTKError(f"{what}: an entry is a scalar tensor; every entry needs the sample axis first, [n, ...]")
        sizes.append(t.shape[0])
    if len(set(sizes)) > 1:
        names = list(x) if isinstance(x, dict) else list(range(len(sizes)))
        raise DNTKError(f"{what}: entries disagree on the number of samples (dim 0): "
                        + ", ".join(f"{k}: {s}" for k, s in zip(names, sizes)))
    return sizes[0]


def map_leaves(fn, x):
    """The same structure with ``fn`` applied to every tensor (a PaddedTokens stays one)."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, tuple):
        return tuple(fn(v) for v in x)
    if isinstance(x, PaddedTokens):
        return x.like({k: fn(v) for k, v in x.items()})
    if isinstance(x, dict):
        return {k: fn(v) for k, v in x.items()}
    _check(x)


def take(x, index):
    """Samples ``index`` (a slice, an int64 index tensor or a list of ints) of every entry; a
    PaddedTokens batch is cut to its longest taken sequence. A boolean index is refused (it would be
    read as 0/1 positions by some callers): pass ``torch.nonzero(mask).flatten()``."""
    if not isinstance(index, slice):
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            raise DNTKError("take: a boolean mask is not an index; pass torch.nonzero(mask).flatten()")
        index = index.long()
    out = map_leaves(lambda t: t[index], x)
    return out.trimmed() if isinstance(out, PaddedTokens) else out


def to(x, device):
    """Every entry moved to ``device``."""
    return map_leaves(lambda t: t.to(device), x)


def call(model, x):
    """``model(x)``, ``model(*x)`` or ``model(**x)`` by the form of x; returns :func:`logits_of` the output."""
    if isinstance(x, torch.Tensor):
        out = model(x)
    elif isinstance(x, tuple):
        out = model(*x)
    elif isinstance(x, dict):
        out = model(**x)
    else:
        _check(x)
    return logits_of(out)


def logits_of(out):
    """The logits in a model's output: the tensor itself, ``out.logits`` (Hugging Face ModelOutput), or
    ``out["logits"]``; anything else is returned unchanged (the caller's shape check names it)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, dict) and isinstance(out.get("logits"), torch.Tensor):
        return out["logits"]
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    return out


def is_images(x) -> bool:
    """x is one floating tensor [n, c, h, w] — what augmentation, WMDD and image grids need."""
    return isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() == 4


def describe(x) -> str:
    """'float32 [n, 3, 32, 32]' or '{input_ids: int64 [n, 17], attention_mask: int64 [n, 17]}'."""
    def one(t):
        return f"{str(t.dtype).replace('torch.', '')} [{', '.join(map(str, t.shape))}]"
    if isinstance(x, torch.Tensor):
        return one(x)
    if isinstance(x, tuple):
        return "(" + ", ".join(one(t) for t in x) + ")"
    if isinstance(x, dict):
        return "{" + ", ".join(f"{k}: {one(t)}" for k, t in x.items()) + "}"
    return type(x).__name__


def to_plain(x):
    """A form torch.load(weights_only=True) reads back: {"kind", "value"} with plain containers."""
    kind = "padded" if isinstance(x, PaddedTokens) else type(x).__name__
    if isinstance(x, torch.Tensor):
        kind = "tensor"
    value = dict(x) if isinstance(x, dict) else (list(x) if isinstance(x, tuple) else x)
    return {"kind": kind, "value": value, "seq_keys": list(x.seq_keys) if isinstance(x, PaddedTokens) else None}


def from_plain(blob):
    """The inverse of :func:`to_plain`; a bare tensor (older files) is returned as it is."""
    if isinstance(blob, torch.Tensor):
        return blob
    kind, value = blob["kind"], blob["value"]
    if kind == "tensor":
        return value
    if kind == "tuple":
        return tuple(value)
    if kind == "padded":
        return PaddedTokens(value, blob.get("seq_keys"))
    return dict(value)


# --- reading a Dataset item or loader batch -----------------------------------------------------------
LABEL_KEYS = ("labels", "label", "y")


def _as_inputs(x):
    if isinstance(x, list):
        x = tuple(x)
    if not is_batch(x):
        raise DNTKError(f"cannot read inputs from a batch part of type {type(x).__name__}; yield tensors, tuples or "
                        "dicts of tensors, optionally paired with labels as (x, y)")
    return x


def split_item(batch):
    """(inputs, labels or None) of one loader batch (see the module docstring)."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, (list, tuple)) and batch:
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return _as_inputs(batch[0]), y
    if isinstance(batch, dict) and batch:
        if "x" in batch:
            return _as_inputs(batch["x"]), batch.get("y")
        label = next((k for k in LABEL_KEYS if k in batch), None)
        x = {k: v for k, v in batch.items() if k != label}
        return _as_inputs(x), batch[label] if label is not None else None
    raise DNTKError(f"cannot read inputs from a batch of type {type(batch).__name__}; yield tensors or (x, y) pairs")
