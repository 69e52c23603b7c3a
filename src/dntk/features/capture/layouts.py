"""Which entries of a recorded tensor belong to which sample of the batch: the :class:`Layout` a call's
output has (``(dim, major|minor)``), its measurement from weighted backward passes
(:func:`measure_layouts`, see the package docstring for the argument), and the helpers that split a
tensor or a cotangent by sample.

Everything here is a function of tensors and the autograd graph; nothing depends on which op made
them, so it is unit-tested directly (tests/test_layout_cache.py, tests/test_capture_rules.py)."""

from __future__ import annotations

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


def value_tol(dtype: torch.dtype) -> float:
    """Relative tolerance (of max|logit| + 1) for logits that must agree when a batch is rerun, reordered or
    split into single samples: float64 1e-9, float32 1e-4, half precision 16·eps (bf16 0.125, fp16 0.016) —
    a batch and a single sample take other kernels, whose roundings differ by a few units of the dtype, and
    these checks look for samples that mix, not for rounding."""
    if dtype == torch.float64:
        return 1e-9
    return 16 * float(torch.finfo(dtype).eps) if dtype in HALF else 1e-4


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


def spell_samples(g1, qs, where, tol, B, i) -> torch.Tensor:
    """Sample index of every entry in ``where``: bit j is 1 where the pass weighted 2^{bit_j(b)} gave
    2× the plain gradient g1, 0 where it gave 1×. Anything else feeds several samples: LayoutError(i)."""
    ids = torch.zeros(g1.shape, dtype=torch.long, device=g1.device)
    for j, q in enumerate(qs):
        q = q if q is not None else torch.zeros_like(g1)
        one, two = (q - g1).abs() <= tol, (q - 2 * g1).abs() <= tol
        if not bool((one | two)[where].all()):
            raise LayoutError(i)
        ids |= two.long() << j
    if bool((ids[where] >= B).any()):
        raise LayoutError(i)
    return ids


def measure_layouts(logits: torch.Tensor, outs: list, seed: int = 0) -> tuple[list, bool, list]:
    """For each recorded output: a :class:`Layout`, an index tensor (sample of every entry, when no
    layout explains it), or None (no gradient reaches it in this batch); whether every layout was
    the only one consistent with the batch; and per output whether no path of the graph reaches it at
    all (``unused``: autograd returns no gradient — structural, unlike an all-zero gradient of this
    batch). Raises LayoutError(i) when an entry of output i feeds several samples."""
    B, C = logits.shape
    gen = torch.Generator().manual_seed(7919 + seed)
    r = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(logits.dtype).to(logits.device)
    s = logits @ r
    nbits = max(1, (B - 1).bit_length())

    def grads(w):
        out = torch.autograd.grad((s * w).sum(), outs, retain_graph=True, allow_unused=True)
        return list(out)

    base = grads(torch.ones(B, dtype=s.dtype, device=s.device))
    ar = torch.arange(B, device=s.device)
    bits = [grads((((ar >> j) & 1) + 1).to(s.dtype)) for j in range(nbits)]
    layouts, unique = [], True
    for i, o in enumerate(outs):
        g1 = base[i]
        if g1 is None:
            layouts.append(None)
            continue
        finite = torch.isfinite(g1)
        mag = torch.where(finite, g1.abs(), torch.zeros_like(g1))
        top = float(mag.max()) if mag.numel() else 0.0
        if top == 0.0:
            if not bool(finite.all()):
                raise DNTKError("non-finite gradients in the batch, everywhere in a layer's output; check the inputs for "
                                "NaN/inf and the model for overflow (e.g. run in float64)")
            layouts.append(None)
            continue
        eps, tiny = measure_eps(g1.dtype), float(torch.finfo(g1.dtype).tiny)
        # non-finite entries are left out (the layout carries them to their samples), and so are entries near
        # the subnormal range, where rounding does not commute with scaling by 2 (float16 below 6.1e-5)
        support = mag > max(top * 1e3 * eps, 4 * tiny)
        if not bool(support.any()):
            raise DNTKError(f"the gradients of a layer's output are all below {4 * tiny:.2g}, near the subnormal range of "
                            f"{str(g1.dtype).replace('torch.', '')}, where the samples they belong to cannot be told "
                            "apart; run the model in float32 (or bfloat16, which has float32's range)")
        tol = 1e-3 * mag + top * 1e2 * eps + tiny
        qs = [bits[j][i] for j in range(nbits)]
        ids = spell_samples(g1, qs, support, tol, B, i)
        found, matches = None, 0
        for d in range(o.dim()):
            if o.shape[d] % B:
                continue
            # a dimension of exactly B entries has one layout: 'major' and 'minor' name the same map (b ↦ b), so
            # counting both would make every batch-first output ambiguous and nothing would ever be cached
            for order in ("major",) if o.shape[d] == B else ("major", "minor"):
                lay = Layout(d, order)
                if bool((sample_ids(o.shape, lay, B, o.device) == ids)[support].all()):
                    matches += 1
                    found = found or lay
        if matches != 1:
            unique = False  # several layouts (or none) explain this batch: valid here, not cached
        if found is None:
            # an index map for this batch: every entry with any gradient must be classified
            full = finite & (g1 != 0)
            if bool((full & ~support).any()):
                ids = spell_samples(g1, qs, full, 1e-3 * g1.abs(), B, i)
            ids = ids.masked_fill(~full, 0)
        layouts.append(found if found is not None else ids)
    return layouts, unique, [g is None for g in base]
