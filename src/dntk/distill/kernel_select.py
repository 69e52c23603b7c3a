"""Kernel-aware stage 1: choose the m real training images from a candidate pool by what the kernel
model itself gets wrong.

The method (``kernel-greedy``): draw a seeded random pool of ``pool_factor × ipc`` real images per
class, compute the pool's projected per-logit gradient features (the only Jacobians it needs:
``pool_factor × m`` images), then add images one at a time, always the one whose addition lowers the
per-class kernel model's squared error on the teacher's logits *over the whole pool* the most, until
every class has ``ipc`` images. ``kernel-herding`` is the unsupervised variant: the image that lowers
the total posterior variance (the Nyström error tr(K − K_PS K_SS⁻¹ K_SP)) on the pool the most.

Why the greedy is exact and cheap. For class c, the trace-normalised KRR with relative ridge λ on a
set S is the posterior mean of a Gaussian process with kernel K̃_c = K_c / ν_c and noise λ. Adding one
point j updates the pool's residual r and posterior covariance Σ in closed form:

    r ← r − Σ[:, j] · r_j / (Σ_jj + λ),        Σ ← Σ − Σ[:, j] Σ[j, :] / (Σ_jj + λ),

so the error reduction of every candidate j is known before choosing it:
``Δ_c(j) = 2 a_j (Σ r)_j − a_j² ‖Σ[:, j]‖²`` with ``a_j = r_j / (Σ_jj + λ)`` (and ``‖Σ[:, j]‖² /
(Σ_jj + λ)`` for the variance). One step costs O(C n²) for a pool of n images; the features enter
only through the C pool kernels [n, n] (float64). ν_c is the pool's mean kernel diagonal — the KRR
fitted afterwards on the chosen m uses their own ν_c, a difference of one scale factor inside the
tiny relative ridge.

The random subset of the same seed (``--distill random``) is the first ``ipc`` images of each class's
pool, so the two methods are paired: the pool adds candidates, never replaces the random draw's luck.
"""

from __future__ import annotations

import time
from pathlib import Path
from dataclasses import dataclass, field

import torch

from ..data.images import ImageSet
from ..errors import DNTKError
from ..resources import peak_rss_mb, reset_peak_rss
from ..store import FeatureStore, digest, model_checksum
from .distilled import DistilledSet, check_ipc, save_distilled

CRITERIA = {"kernel-greedy": "error", "kernel-herding": "variance"}
MAX_BYTES = 8 * 2**30      # memory the greedy may hold (pool covariances), refused beyond


@dataclass
class Selection:
    """index: LongTensor [ipc·C] of pool rows in the order they were chosen; pool_error[t]: the mean
    squared error (over pool images and logits) of the kernel model on the first t chosen, t = 0..m;
    pool_variance[t]: the mean posterior variance on the pool (Nyström error / n / C)."""

    index: torch.Tensor
    pool_error: list = field(default_factory=list)
    pool_variance: list = field(default_factory=list)


def greedy_kernel_selection(features: torch.Tensor, targets: torch.Tensor, labels: torch.Tensor, ipc: int, *,
                            ridge: float = 1e-4, criterion: str = "error", device="cpu") -> Selection:
    """Greedy forward selection of ``ipc`` pool points per label for the per-class kernel model.

    Args:
        features: [C, n, k] the pool's projected per-logit gradient features (or a FeatureResult).
        targets: [n, C] what the kernel model regresses (the teacher's logits).
        labels: [n] int, the class label of each pool image (the quota is per label).
        ipc: images to choose per label (each label needs at least ipc pool images).
        ridge: λ relative to the mean kernel diagonal, as in :class:`dntk.kernels.PerClassKRR`.
        criterion: ``error`` (squared error on ``targets``) or ``variance`` (posterior variance,
            targets unused).
    Returns: a :class:`Selection`.
    """
    if criterion not in ("error", "variance"):
        raise DNTKError(f"criterion must be 'error' or 'variance', got {criterion!r}")
    if not ridge > 0:
        raise DNTKError(f"ridge must be > 0 for the greedy updates, got {ridge}")
    F = getattr(features, "features", features)
    if F.dim() != 3:
        raise DNTKError(f"features must be [C, n, k], got shape {tuple(F.shape)}")
    C, n, _ = F.shape
    if targets.shape != (n, C):
        raise DNTKError(f"targets must be [n, C] = [{n}, {C}], got {tuple(targets.shape)}")
    labels = torch.as_tensor(labels).long().cpu()
    if labels.shape != (n,):
        raise DNTKError(f"labels must be [n] = [{n}], got {tuple(labels.shape)}")
    counts = torch.bincount(labels, minlength=int(labels.max()) + 1)
    if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
        raise DNTKError(f"ipc must be a positive integer, got {ipc!r}")
    if bool((counts[counts > 0] < ipc).any()):
        raise DNTKError(f"a label has fewer than ipc={ipc} pool images (counts {counts.tolist()}); enlarge the pool")
    need = 2 * C * n * n * 8          # Σ [C, n, n] float64 and one temporary of its size (the refresh)
    if need > MAX_BYTES:
        raise DNTKError(f"the greedy holds C·n² float64 pool covariances: {need / 2**30:.1f} GiB for C={C}, pool n={n} "
                        f"(limit {MAX_BYTES / 2**30:.0f} GiB); lower --pool-factor or --ipc")
    # the GP prior covariance of each class on the pool: K_c / ν_c, ν_c = mean diagonal
    sigma = torch.empty(C, n, n, dtype=torch.float64, device=device)
    for c in range(C):
        phi = F[c].to(device).double()
        K = phi @ phi.T
        nu = torch.diagonal(K).mean()
        if not nu > 0:
            raise DNTKError(f"the pool kernel of class {c} is zero (all gradients vanish)")
        sigma[c] = (K + K.T) / (2 * nu)
        del phi, K
    r = targets.to(device).double().T.contiguous()          # [C, n] residuals; the prior mean is 0
    quota = torch.zeros_like(counts)
    active = labels.to(device)
    chosen = torch.zeros(n, dtype=torch.bool, device=device)
    order = []
    err, var = [float((r * r).mean())], [float(torch.diagonal(sigma, dim1=1, dim2=2).mean())]
    total = ipc * int((counts > 0).sum())
    col2 = (sigma * sigma).sum(1)                                            # ‖Σ[:, i]‖² [C, n]
    sr = torch.bmm(sigma, r.unsqueeze(2)).squeeze(2)                         # Σ r [C, n]
    for step in range(total):
        d = torch.diagonal(sigma, dim1=1, dim2=2).clamp_min(0) + ridge    # [C, n]
        if criterion == "error":
            a = r / d
            gain = (2 * a * sr - a * a * col2).sum(0)
        else:
            gain = (col2 / d).sum(0)
        full = (quota >= ipc).to(device)[active]
        gain = gain.masked_fill(chosen | full, float("-inf"))
        j = int(torch.argmax(gain))
        s = sigma[:, :, j].clone()                                           # Σ[:, j] = Σ[j, :] [C, n]
        coef = s / d[:, j:j + 1]
        rj = r[:, j:j + 1].clone()
        ss = torch.bmm(sigma, s.unsqueeze(2)).squeeze(2)                     # Σ s, the one pass over Σ
        # with Σ' = Σ − coef sᵀ and r' = r − coef r_j (everything below is [C, n] or [C, 1]):
        #   ‖Σ'[:, i]‖² = ‖Σ[:, i]‖² − 2 coef_i (Σ s)_i + coef_i² ‖s‖²
        #   Σ' r' = Σ r − r_j Σ s / d_j − coef (s·r) + coef r_j (s·coef)
        s_dot_r = (s * r).sum(1, keepdim=True)
        col2 = col2 - 2 * coef * ss + coef * coef * (s * s).sum(1, keepdim=True)
        sr = sr - rj * ss / d[:, j:j + 1] - coef * s_dot_r + coef * rj * (s * coef).sum(1, keepdim=True)
        r = r - coef * rj
        sigma.baddbmm_(coef.unsqueeze(2), s.unsqueeze(1), alpha=-1.0)      # in place, no [C, n, n] temporary
        if (step + 1) % 64 == 0:                                             # bound the drift of the recursions
            col2 = (sigma * sigma).sum(1)
            sr = torch.bmm(sigma, r.unsqueeze(2)).squeeze(2)
        chosen[j] = True
        quota[int(labels[j])] += 1
        order.append(j)
        err.append(float((r * r).mean()))
        var.append(float(torch.diagonal(sigma, dim1=1, dim2=2).clamp_min(0).mean()))
    return Selection(torch.tensor(order, dtype=torch.long), err, var)


def pool_indices(dataset: ImageSet, ipc: int, pool_factor: int, seed: int) -> torch.Tensor:
    """The candidate pool: per class, the first ``pool_factor × ipc`` images (all of a smaller class)
    of the same seeded permutation ``--distill random`` takes its first ``ipc`` from. LongTensor of
    dataset indices, grouped by class."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for c in range(dataset.num_classes):
        idx = torch.nonzero(dataset.labels == c).flatten()
        out.append(idx[torch.randperm(idx.numel(), generator=gen)[:pool_factor * ipc]])
    return torch.cat(out)


def select_kernel_aware(dataset: ImageSet, ipc: int, method: str, *, teacher, projector, pool_factor: int = 4,
                        ridge: float = 1e-4, targets: str = "logits", seed: int = 0, out_dir=None, device="cpu",
                        batch_size: int = 32, progress: bool = True, pool_features=None) -> DistilledSet:
    """``kernel-greedy`` / ``kernel-herding`` (see the module doc): ipc images per class chosen from a
    seeded pool of pool_factor × ipc per class by their effect on the kernel model of ``teacher`` with
    ``projector``'s features, regressing ``targets`` (``logits``: the teacher's; ``onehot``: the labels)
    with relative ``ridge`` — the kernel model fitted afterwards. The pool's features are kept in
    ``out_dir/pool-features-<key>`` (a FeatureStore keyed by teacher, projector and pool: a rerun or an
    interrupted run computes only what is missing). pool_features: precomputed features of
    the pool (a FeatureResult in pool order, e.g. read from a store) — then no Jacobian is computed here. The manifest records the pool
    size, the per-logit Jacobians it cost and the pool error after each pick."""
    from ..features import gradient_features

    if method not in CRITERIA:
        raise DNTKError(f"unknown kernel-aware method {method!r}; use one of {sorted(CRITERIA)}")
    if isinstance(pool_factor, bool) or not isinstance(pool_factor, int) or pool_factor < 1:
        raise DNTKError(f"pool_factor must be an integer ≥ 1, got {pool_factor!r}")
    if teacher is None or projector is None:
        raise DNTKError(f"{method} needs the teacher and a projector (its kernel model's features)")
    check_ipc(dataset, ipc)
    reset_peak_rss()
    t0 = time.perf_counter()
    pool = pool_indices(dataset, ipc, pool_factor, seed)
    X, y = dataset.tensors(pool)
    if targets not in ("logits", "onehot"):
        raise DNTKError(f"targets must be 'logits' or 'onehot', got {targets!r}")
    if pool_features is None and out_dir is not None:    # resumable: an interrupted run keeps its shards
        # one store per (teacher, projector, pool): changing --k, --pool-factor or the teacher extracts anew
        key = digest(model_checksum(teacher), projector.name, projector.k, projector.seed, pool)
        store = FeatureStore(Path(out_dir) / f"pool-features-{key}", shard=256)
        done = store.extract(teacher, X, projector, batch_size=batch_size, device=device, progress=progress)
        feats = store.read(projector=projector)
        computed = sum(b - a for i, (a, b) in enumerate(store.ranges(len(pool))) if i in done)
    elif pool_features is None:
        feats = gradient_features(teacher, X, projector, batch_size=batch_size, device=device, progress=progress)
        computed = len(pool)
    else:
        feats, computed = pool_features, 0
        if feats.features.shape[1] != len(pool):
            raise DNTKError(f"pool_features has {feats.features.shape[1]} rows for a pool of {len(pool)} images")
    t_features = time.perf_counter() - t0
    C = feats.features.shape[0]
    Y = feats.logits if targets == "logits" else torch.nn.functional.one_hot(y.long(), C).double()
    sel = greedy_kernel_selection(feats, Y, y, ipc, ridge=ridge, criterion=CRITERIA[method], device=device)
    index = pool[sel.index]
    x, labels = dataset.tensors(index)
    ds = DistilledSet.from_normalised(x, labels, dataset, method)
    if out_dir is not None:
        save_distilled(ds, out_dir, {
            "method": method,
            "settings": {"ipc": ipc, "seed": seed, "pool_factor": pool_factor, "ridge": ridge, "targets": targets,
                         "projector": {"name": projector.name, "k": projector.k, "seed": projector.seed},
                         "criterion": CRITERIA[method]},
            "indices": index.tolist(), "pool_indices": pool.tolist(),
            "jacobians": {"pool_images": len(pool), "per_logit_gradients": len(pool) * C,
                          "computed_here": computed * C, "computed_here_images": computed, "feature_seconds": t_features},
            "pool_error": sel.pool_error, "pool_variance": sel.pool_variance,
            "seconds": time.perf_counter() - t0, "peak_memory_mb": peak_rss_mb()})
    return ds
