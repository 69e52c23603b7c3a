"""Which entries of a recorded tensor belong to which sample of the batch: the :class:`Layout` a call's
output has (``(dim, major|minor)``), its measurement from weighted backward passes
(:func:`measure_layouts`, see the package docstring for the argument), and the helpers that split a
tensor or a cotangent by sample.

Everything here is a function of tensors and the autograd graph; nothing depends on which op made
them, so it is unit-tested directly (tests/test_layout_cache.py, tests/test_capture_rules.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...errors import DNTKError


@dataclass(frozen=True)
class Layout:
    """Where the samples of a batch sit in a recorded tensor: dim ``dim`` of size B·r holds sample
    b at indices b·r … b·r + r − 1 (``major``) or at b, b + B, … (``minor``). B = 1 needs none."""

    dim: int
    order: str  # "major" | "minor"


HALF = (torch.float16, torch.bfloat16)


def measure_eps(dtype: torch.dtype) -> float:
    """The unit the layout thresholds scale with: the dtype's eps, but float32's for half precision. A half
    dtype's own eps (bf16 2^-7) would make the support threshold 1e3·eps·max exceed the maximum, so no entry
    would be checked and any layout would "match" (silently wrong features for a sequence-first layer).
    Float32's unit is safe there because :func:`measure_layouts` weights samples by powers of two: a
    gradient entry that feeds one sample is then exactly w× the plain one in any floating dtype (scaling by
    2 commutes with rounding, barring overflow), and an entry that feeds two differs by a share of it."""
    return float(torch.finfo(torch.float32 if dtype in HALF else dtype).eps)


def coarsest(*dtypes) -> torch.dtype:
    """The floating dtype with the largest eps among ``dtypes`` (non-floating ones ignored; float32 if none)."""
    fl = [d for d in dtypes if d is not None and d.is_floating_point]
    return max(fl, key=lambda d: torch.finfo(d).eps) if fl else torch.float32


def agree_tol(ref: torch.Tensor, dtype: torch.dtype | None = None):
    """Absolute tolerance for logits that must agree when a batch is rerun, reordered or split into single
    samples; ``dtype`` is the coarsest dtype the model computes in (default: the logits'). float64
    1e-9·(max|ref| + 1), float32 1e-4·(max|ref| + 1); half precision 2·eps·max|ref| + 4·tiny — a batch and a
    single sample take other kernels whose roundings differ by a few units of the dtype (≤ 0.3 eps of the
    largest logit measured on CPU models), and these checks look for samples that mix, not for rounding;
    a looser half-precision bound let a detached batch mean (1.8% of the logits) through."""
    dtype = dtype or ref.dtype
    top = ref.detach().abs().amax() if ref.numel() else ref.new_zeros(())
    if dtype in HALF:
        e = torch.finfo(dtype)
        return 2 * e.eps * top + 4 * e.tiny
    return (1e-9 if dtype == torch.float64 else 1e-4) * (top + 1.0)


def split_batch(t: torch.Tensor, layout, B: int) -> torch.Tensor:
    """[..., N = B·r at layout.dim, ...] → [B, ...] with the r entries in the old place, so that
    dim i of t is dim i + 1 of the result."""
    if layout is None:
        return t.unsqueeze(0)
    d = layout.dim
    r = t.shape[d] // B
    if layout.order == "major":
        return t.unflatten(d, (B, r)).movedim(d, 0)
    return t.unflatten(d, (r, B)).movedim(d + 1, 0)


def sample_ids(shape, layout: Layout, B: int, device) -> torch.Tensor:
    N = shape[layout.dim]
    ar = torch.arange(N, device=device)
    ids = ar // (N // B) if layout.order == "major" else ar % B
    view = [1] * len(shape)
    view[layout.dim] = N
    return ids.view(view).expand(shape)


def masked(g: torch.Tensor, layout, B: int, ids: torch.Tensor | None, bs: slice) -> torch.Tensor:
    """Output gradient g split into one cotangent per sample of bs: [len(bs), *g.shape]."""
    samples = torch.arange(B, device=g.device)[bs]
    if layout is None and ids is None:
        return g.unsqueeze(0)
    if ids is None:
        ids = sample_ids(g.shape, layout, B, g.device)
    mask = ids.unsqueeze(0) == samples.view(-1, *([1] * g.dim()))
    return g.unsqueeze(0) * mask.to(g.dtype)


def differs(alone: list, batch: list, share: float = 0.1) -> torch.Tensor:
    """A device bool: whether the input gradients of a sample run alone and the same sample's in the batch
    differ grossly — ‖a − b‖ > share · max(‖a‖, ‖b‖) for some input (a gradient missing on one side counts
    as zero). Meant for a gradient cut or changed by the batch context (a detach taken only in some
    batches), not for rounding: batch and single-sample passes round differently, and saturated layers
    amplify that, so a tight tolerance would refuse valid models."""
    bad = None
    for a, b in zip(alone, batch):
        if a is None and b is None:
            continue
        ref = (a if a is not None else b).double()
        a = torch.zeros_like(ref) if a is None else a.double()
        b = torch.zeros_like(ref) if b is None else b.reshape(ref.shape).double()
        ok = torch.isfinite(a) & torch.isfinite(b)           # non-finite entries are left to the finite checks
        a, b = torch.where(ok, a, 0.0), torch.where(ok, b, 0.0)
        one = (a - b).norm() > share * torch.maximum(a.norm(), b.norm())
        bad = one if bad is None else bad | one
    return bad if bad is not None else torch.zeros((), dtype=torch.bool)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A small CPU tensor on ``device``; pinned and non-blocking on CUDA (no host synchronisation)."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class LayoutError(Exception):
    pass


def _spell_bit(ids, bad, g1, q, where, tol, j: int):
    """Bit j of the sample index of every entry in ``where``, into ``ids`` (in place): 1 where the pass weighted
    2^{bit_j(b)} gave 2× the plain gradient g1, 0 where it gave 1×; an entry that gave neither feeds several
    samples and sets the device flag ``bad`` (returned)."""
    d = q - g1 if q is not None else -g1            # q − g1: 0 for 1×, g1 for 2×
    two = (d - g1).abs_() <= tol
    one = d.abs_() <= tol
    ids |= two.to(ids.dtype) << j
    return bad | (where & ~(one | two)).any()


def spell_samples(g1, qs, where, tol, B, i) -> torch.Tensor:
    """Sample index of every entry in ``where`` from all the bit passes ``qs`` at once (see :func:`_spell_bit`);
    anything that feeds several samples: LayoutError(i). Checked on the device, read back once."""
    ids = torch.zeros(g1.shape, dtype=_id_dtype(B), device=g1.device)
    bad = torch.zeros((), dtype=torch.bool, device=g1.device)
    for j, q in enumerate(qs):
        bad = _spell_bit(ids, bad, g1, q, where, tol, j)
    bad |= (where & (ids >= B)).any()
    if bool(bad):
        raise LayoutError(i)
    return ids


def _id_dtype(B: int) -> torch.dtype:
    return torch.int16 if B <= 1 << 14 else torch.int32


def half_scale(grads: list) -> float:
    """A power of two 2^j (|j| ≤ 13) that brings the largest finite gradient entry of ``grads`` near 2^8, for
    half-precision passes: scaling the cotangent by 2^j commutes with rounding, so the layouts are unchanged,
    while float16's narrow range (subnormals below 6.1e-5, overflow above 65504) is kept away from the
    entries measured. 1.0 when there is nothing to scale."""
    tops = [float(torch.where(torch.isfinite(g), g.abs(), torch.zeros_like(g)).amax()) for g in grads
            if g is not None and g.numel()]
    top = max(tops, default=0.0)
    if top == 0.0:
        return 1.0
    j = max(-13, min(13, round(8 - math.log2(top))))
    return float(2.0 ** j)


def measure_layouts(logits: torch.Tensor, outs: list, seed: int = 0, checked: int | None = None) -> tuple[list, bool, list]:
    """For each recorded output: a :class:`Layout`, an index tensor (sample of every entry, when no
    layout explains it), or None (no gradient reaches it in this batch); whether every layout was
    the only one consistent with the batch; and per output whether no path of the graph reaches it at
    all (``unused``: autograd returns no gradient — structural, unlike an all-zero gradient of this
    batch). Raises LayoutError(i) when an entry of output i feeds several samples.

    Only the first ``checked`` outputs (default: all) must be classifiable: the rest (the inputs, probed for
    mixing alone) get None when every entry is too small to tell samples apart. When several layouts explain
    the checked entries and other entries carry gradient, the output gets a per-entry index map, not the first
    candidate. In half precision the passes are rescaled by :func:`half_scale`.

    Memory: the plain pass's gradients, a bool support and a small-integer index per entry, and one bit pass
    at a time (each is folded into the indices, then dropped); an output that needs a per-entry map over
    entries outside its support takes the bit passes again."""
    B, C = logits.shape
    gen = torch.Generator().manual_seed(7919 + seed)
    r = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(logits.dtype).to(logits.device)
    s = logits @ r
    nbits = max(1, (B - 1).bit_length())

    def grads(w):
        out = torch.autograd.grad((s * w).sum(), outs, retain_graph=True, allow_unused=True)
        return list(out)

    base = grads(torch.ones(B, dtype=s.dtype, device=s.device))
    scale = 1.0
    if any(g is not None and g.dtype in HALF for g in base):
        scale = half_scale(base)
        if scale != 1.0:
            base = grads(torch.full((B,), scale, dtype=s.dtype, device=s.device))
    ar = torch.arange(B, device=s.device)
    weights = [((((ar >> j) & 1) + 1) * scale).to(s.dtype) for j in range(nbits)]
    checked = len(outs) if checked is None else checked

    def tolerance(i):   # recomputed per bit from the plain gradient rather than held
        e = state[i]   # |g1| where finite; a non-finite entry is outside the support, so its tolerance is never read
        return 1e-3 * base[i].abs() + e["top"] * 1e2 * e["eps"] + e["tiny"]

    state: dict[int, dict] = {}
    layouts: list = [None] * len(outs)
    for i, g1 in enumerate(base):
        if g1 is None:
            continue
        finite = torch.isfinite(g1)
        mag = torch.where(finite, g1.abs(), torch.zeros_like(g1))
        top = float(mag.max()) if mag.numel() else 0.0
        if top == 0.0:
            if not bool(finite.all()):
                raise DNTKError("non-finite gradients in the batch, everywhere in a layer's output; check the inputs for "
                                "NaN/inf and the model for overflow (e.g. run in float64)")
            continue
        eps, tiny = measure_eps(g1.dtype), float(torch.finfo(g1.dtype).tiny)
        # non-finite entries are left out (the layout carries them to their samples), and so are entries near
        # the subnormal range, where rounding does not commute with scaling by 2 (float16 below 6.1e-5)
        support = mag > max(top * 1e3 * eps, 4 * tiny)
        if not bool(support.any()):
            if i >= checked:
                continue   # an input probed for mixing only: nothing here to check it by
            raise DNTKError(f"the gradients of a layer's output are all below {4 * tiny:.2g}, near the subnormal range of "
                            f"{str(g1.dtype).replace('torch.', '')}, where the samples they belong to cannot be told "
                            "apart; run the model in float32 (or bfloat16, which has float32's range)")
        state[i] = {"top": top, "eps": eps, "tiny": tiny, "support": support,
                    "ids": torch.zeros(g1.shape, dtype=_id_dtype(B), device=g1.device),
                    "bad": torch.zeros((), dtype=torch.bool, device=g1.device)}
    for j, w in enumerate(weights):
        q = grads(w)
        for i, e in state.items():
            e["bad"] = _spell_bit(e["ids"], e["bad"], base[i], q[i], e["support"], tolerance(i), j)
        del q
    unique, remap = True, []
    for i, e in state.items():
        o, ids, support = outs[i], e["ids"], e["support"]
        if bool(e["bad"] | (support & (ids >= B)).any()):
            raise LayoutError(i)
        g1 = base[i]
        found, matches = None, 0
        for d in range(o.dim()):
            if o.shape[d] % B:
                continue
            # a dimension of exactly B entries has one layout: 'major' and 'minor' name the same map (b ↦ b), so
            # counting both would make every batch-first output ambiguous and nothing would ever be cached
            for order in ("major",) if o.shape[d] == B else ("major", "minor"):
                lay = Layout(d, order)
                if not bool(((sample_ids(o.shape, lay, B, o.device) != ids) & support).any()):
                    matches += 1
                    found = found or lay
        if matches != 1:
            unique = False  # several layouts (or none) explain this batch: valid here, not cached
        finite = torch.isfinite(g1)
        if matches > 1 and bool((finite & (g1 != 0) & ~support).any()):
            found = None    # the checked entries fit several layouts and others carry gradient: classify each entry
        if found is None:
            # an index map for this batch: every entry with any gradient must be classified
            full = finite & (g1 != 0)
            if bool((full & ~support).any()):
                remap.append((i, full))
            else:
                layouts[i] = ids.long().masked_fill(~full, 0)
        else:
            layouts[i] = found
    if remap:   # rare: entries outside the support need their own spelling, from the bit passes again
        qs = [grads(w) for w in weights]
        for i, full in remap:
            ids = spell_samples(base[i], [q[i] for q in qs], full, 1e-3 * base[i].abs(), B, i)
            layouts[i] = ids.long().masked_fill(~full, 0)
    return layouts, unique, [g is None for g in base]
