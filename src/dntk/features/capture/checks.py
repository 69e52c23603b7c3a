"""The engine's checks that a batch's per-sample gradients are the model's gradients on single inputs:
a forward that is not repeatable (random), samples whose logits or input gradients change when run
alone, and the verification of cached layouts on a later batch (:func:`still_holds`). Each takes the
:class:`~dntk.features.capture.core.GradientCapture` whose model it runs (its methods of the same
names call these)."""

from __future__ import annotations

import random

import torch

from ... import samples
from ...errors import DNTKError
from .layouts import HALF, Layout, agree_tol, coarsest, differs, sample_ids, to_device
from .params import analysis_mode, check_logits, random_forward_message


def model_dtype(cap, logits) -> torch.dtype:
    """The coarsest floating dtype of the model's parameters and its logits: a bfloat16 body with a float32
    head rounds like bfloat16, so its agreement checks need bfloat16's tolerance."""
    return coarsest(logits.dtype, *(p.dtype for p in cap.model.parameters()))


def check_repeatable(cap, x, logits):
    """The same batch run again (no grad) gives the same logits, or the forward is random (it draws from
    a generator of its own, which the global-RNG check cannot see)."""
    with torch.no_grad(), analysis_mode(cap.model):
        again = check_logits(samples.call(cap.model, samples.map_leaves(torch.clone, x)), samples.count(x))
    ref = logits.detach()
    tol = float(agree_tol(ref, model_dtype(cap, ref)))
    if bool(torch.isfinite(ref).all()) and float((again - ref).abs().max()) > tol:
        raise DNTKError(random_forward_message("the same input run twice gave different logits"))

def integer_inputs(x) -> bool:
    """Whether the batch has entries that are not differentiated (token ids, integer masks): samples can mix
    through them where no gradient flows, so every sample of such a batch is run alone, measured or verified."""
    return any(not t.is_floating_point() for t in samples.leaves(x))


def still_holds(cap, x, logits, probe: list, layouts: list, B: int) -> bool:
    """Whether cached ``layouts`` still explain this batch, checked on the device and read back once:

    - gradients: one backward pass of s = logits · r and one of Σ_b w_b s_b with distinct weights w = a
      random permutation of 1..B. Where every entry of every recorded output (and of the inputs, layout
      0-major) feeds its own sample only, the weighted gradient is w[sample] × the plain one; an entry
      feeding samples b ≠ b' is off by (w_b' − w_b) × its share ≥ its share. Compared on the entries
      measure_layouts classifies (|g| > 1e3·eps·max), relative tolerance w[sample]·rtol (1e-8 in float64,
      1e-4 otherwise) — so at B·rtol > 0.05 the batch is measured instead; an entry with a weighted
      gradient where the plain one vanishes (cancelling shares) also fails. An output cached as unused
      must still get no gradient.
    - values, for coupling the gradient cannot see (integer routing, detached values, queues in batch
      order): the batch run again in a random order must give the same logits permuted; sample 0 and a
      random sample j ≥ 1 run alone must give their batch logits and (within 10%, :func:`~.layouts.differs`) their
      input gradients in the batch — every sample, when the batch has integer inputs (:func:`integer_inputs`).

    In half precision it answers False (the batch is measured): w·g with w in 1..B is not exact there, so
    the tolerance would have to be as loose as the rounding, and :func:`~.layouts.measure_layouts`, whose
    weights are powers of two, is exact."""
    dev, dt = logits.device, logits.dtype
    mdt = model_dtype(cap, logits)
    if mdt in HALF or any(p is not None and p.dtype in HALF for p in probe):
        return False
    rtol = 1e-8 if dt == torch.float64 else 1e-4
    if B * rtol > 0.05:
        return False   # the weights' gaps are too small against the tolerance: measure this batch
    gen = torch.Generator().manual_seed(7919 + cap._passes)
    r = torch.rand(logits.shape[1], generator=gen, dtype=torch.float64) + 0.5
    w = (torch.randperm(B, generator=gen) + 1).to(torch.float64)
    perm = torch.randperm(B, generator=gen)
    j = random.Random(7919 + cap._passes).randrange(1, B)   # a host draw: no tensor read back
    r, w = (to_device(t.to(dt), dev) for t in (r, w))
    perm_dev = to_device(perm, dev)
    s = logits @ r
    base = torch.autograd.grad(s.sum(), probe, retain_graph=True, allow_unused=True)
    weighted = torch.autograd.grad((s * w).sum(), probe, retain_graph=True, allow_unused=True)
    n_out = len(layouts)
    lays = list(layouts) + [Layout(0, "major")] * (len(probe) - n_out)
    bad = torch.zeros((), dtype=torch.bool, device=dev)
    for g1, gw, lay in zip(base, weighted, lays):
        if lay is None:                         # cached as unused: no graph path may reach it now
            if g1 is not None or gw is not None:
                return False
            continue
        if g1 is None or gw is None:
            if (g1 is None) != (gw is None):
                return False
            continue
        e = torch.finfo(g1.dtype).eps
        finite = torch.isfinite(g1) & torch.isfinite(gw)
        mag = torch.where(finite, g1.abs(), torch.zeros_like(g1))
        top = mag.amax()
        support = mag > top * 1e3 * e
        wi = w.to(g1.dtype)[sample_ids(g1.shape, lay, B, g1.device)]
        off = (gw - g1 * wi).abs()
        bad = bad | (finite & support & (off > wi * (rtol * mag + top * 1e2 * e))).any()
        bad = bad | (finite & ~support & (gw.abs() > B * top * 1e4 * e)).any()
    leaves = probe[n_out:]
    with torch.no_grad(), analysis_mode(cap.model):
        again = samples.call(cap.model, samples.map_leaves(torch.clone, samples.take(x, perm_dev)))
    ref = logits.detach()[perm_dev]
    if again.shape != ref.shape:
        return False
    ftol = agree_tol(ref, mdt)
    bad = bad | (torch.isfinite(ref).all() & ((again - ref).abs().amax() > ftol))
    for i in (range(B) if integer_inputs(x) else (0, j)):
        alone, grads = cap._alone(x, i, r, with_grad=bool(leaves))
        ref = logits[i:i + 1].detach()
        if alone.shape != ref.shape:
            return False
        tol = agree_tol(ref, mdt)
        bad = bad | (torch.isfinite(ref).all() & ((alone - ref).abs().amax() > tol))
        if grads is not None:
            bad = bad | differs(grads, [None if g is None else g[i:i + 1] for g in base[n_out:]]).to(dev)
    cap.verified += 1
    return not bool(bad)   # the one read-back of the check

def alone(cap, x, i: int, r: torch.Tensor, with_grad: bool):
    """Sample i run alone: its logits [1, C] and, with_grad, the gradients of its s = logits · r with
    respect to its floating inputs (else None)."""
    one = samples.map_leaves(torch.clone, samples.take(x, slice(i, i + 1)))
    if not with_grad:
        with torch.no_grad(), analysis_mode(cap.model):
            return samples.call(cap.model, one), None
    leaves = []

    def tag(t):
        if t.is_floating_point():
            leaf = t.detach().requires_grad_(True)
            leaves.append(leaf)
            return leaf.clone()   # not a leaf: the model may modify its input in place
        return t

    one = samples.map_leaves(tag, one)
    with torch.enable_grad(), analysis_mode(cap.model):
        out = samples.call(cap.model, one)
        if not out.requires_grad:
            return out.detach(), [None] * len(leaves)
        grads = torch.autograd.grad((out @ r.to(out.dtype)).sum(), leaves, allow_unused=True)
    return out.detach(), list(grads)

def check_alone_gradients(cap, x, logits, leaves, n: int = 4):
    """A measured batch: the input gradients of a few samples run alone must be their input gradients in
    the batch (a model that cuts the gradient, e.g. detaches, only in some batch contexts would
    otherwise give other per-sample gradients than the model alone, with the same logits)."""
    if not leaves or not logits.requires_grad:
        return
    gen = torch.Generator().manual_seed(104729 + cap._passes)
    r = (torch.rand(logits.shape[1], generator=gen, dtype=torch.float64) + 0.5).to(logits.dtype).to(logits.device)
    batch = torch.autograd.grad((logits @ r).sum(), leaves, retain_graph=True, allow_unused=True)
    for i in range(min(n, samples.count(x))):
        _, alone = cap._alone(x, i, r, with_grad=True)
        if bool(differs(alone, [None if g is None else g[i:i + 1] for g in batch])):
            raise DNTKError(
                f"the model's gradient for sample {i} depends on the rest of its batch (its input gradient "
                "differs when it is run alone, though its logits may not), so per-sample gradients of a batch "
                "are not defined; use batch_size=1, or remove the batch-dependent operation")

def check_alone(cap, x, logits, n: int = 4):
    """The logits of a few samples computed alone must equal their logits in the batch (catches
    models whose outputs mix samples through values the gradient test cannot see)."""
    mdt = model_dtype(cap, logits)
    with torch.no_grad(), analysis_mode(cap.model):
        for i in range(min(n, samples.count(x))):
            # clone: a model may modify its input
            alone = samples.call(cap.model, samples.map_leaves(torch.clone, samples.take(x, slice(i, i + 1))))
            ref = logits[i : i + 1].detach()
            tol = float(agree_tol(ref, mdt))
            if not torch.isfinite(ref).all():
                continue
            if alone.shape != ref.shape or float((alone - ref).abs().max()) > tol:
                again = samples.call(cap.model, samples.map_leaves(torch.clone, samples.take(x, slice(i, i + 1))))
                if again.shape == alone.shape and float((again - alone).abs().max()) > tol:
                    raise DNTKError(random_forward_message(f"sample {i} run alone twice gave different logits"))
                padded = (" or on its padding (its tokens are cut to its own length when it is run alone: mask the "
                          "padding in the model, or pad every sequence to one length with --max-length)"
                          if isinstance(x, samples.PaddedTokens) else "")
                raise DNTKError(
                    f"the model's output for sample {i} depends on the rest of its batch{padded} (its logits differ "
                    "when it is run alone), so per-sample gradients of a batch are not defined; use batch_size=1, "
                    "or remove the cross-sample operation")
