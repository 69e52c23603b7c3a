"""Selection baselines at the same budget s: keep s of the m real gradients of each class kernel.

random — uniform without replacement; fps — farthest-point sampling in projected-gradient space
(L2, random start); kmeans — k-means with s centroids, the real point nearest each centroid
(no duplicates); leverage — ridge leverage scores diag(K(K + λI)⁻¹) of the trace-normalised
kernel, sampled without replacement in proportion to the score. All seeded, per class.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import validate as V
from ..errors import DNTKError
from ..kernels.normalisation import class_scale
from .local_global import DistilledGradients, _budget, _check_inputs

SELECTION_METHODS = ("random", "fps", "kmeans", "leverage")


def ridge_leverage_scores(K: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """diag(K̃ (K̃ + λI)⁻¹) with K̃ = K / mean(diag K): K [m, m] → [m]; ridge λ ≥ 0."""
    K = V.kernel(K, "K", classes=False, where="ridge_leverage_scores")
    ridge = V.nonnegative(ridge, "ridge", "pass λ ≥ 0 (relative to the mean diagonal)", where="ridge_leverage_scores")
    Kt = K / class_scale(kernels=K, check=False)[0].clamp_min(1e-300)
    lam, vec = torch.linalg.eigh((Kt + Kt.T) / 2)
    lam = lam.clamp_min(0)
    return ((vec ** 2) * (lam / (lam + ridge))).sum(1)


def _select(phi: torch.Tensor, s: int, method: str, gen: np.random.Generator, ridge: float) -> list[int]:
    m = phi.shape[0]
    if method == "random":
        return gen.choice(m, size=s, replace=False).tolist()
    if method == "fps":
        picks = [int(gen.integers(m))]
        dist = ((phi - phi[picks[0]]) ** 2).sum(1)
        for _ in range(s - 1):
            dist[picks] = -1
            nxt = int(torch.argmax(dist))
            picks.append(nxt)
            dist = torch.minimum(dist, ((phi - phi[nxt]) ** 2).sum(1))
        return picks
    if method == "kmeans":
        from sklearn.cluster import KMeans

        X = phi.numpy()
        km = KMeans(n_clusters=s, n_init=10, random_state=int(gen.integers(2**31 - 1))).fit(X)
        d = ((X[:, None, :] - km.cluster_centers_[None]) ** 2).sum(-1)  # [m, s]
        picks, used = [], set()
        for j in np.argsort(d.min(0)):  # centroids with a close point first
            for i in np.argsort(d[:, j]):
                if i not in used:
                    used.add(int(i))
                    picks.append(int(i))
                    break
        return picks
    if method == "leverage":
        score = ridge_leverage_scores(phi @ phi.T, ridge).clamp_min(0).numpy()
        p = score / score.sum() if score.sum() > 0 else None
        nz = int((score > 0).sum())
        if p is not None and nz < s:  # not enough positive scores: top up uniformly among the rest
            first = np.nonzero(score > 0)[0].tolist()
            rest = [i for i in range(m) if i not in set(first)]
            return first + gen.choice(rest, size=s - nz, replace=False).tolist()
        return gen.choice(m, size=s, replace=False, p=p).tolist()
    raise DNTKError(f"unknown selection method {method!r}; valid names: {', '.join(SELECTION_METHODS)}")


def select(features: torch.Tensor, targets: torch.Tensor, s: int, method: str = "random", *, seed: int = 0,
           ridge: float = 1e-4) -> DistilledGradients:
    """s real gradients per class kernel. features [C, m, k], targets [m, C]. The result's
    ``coefficients[c]`` are the one-hot columns of the chosen points; ``record['indices']`` lists
    them."""
    if method not in SELECTION_METHODS:
        raise DNTKError(f"unknown selection method {method!r}; valid names: {', '.join(SELECTION_METHODS)}")
    F, Y = _check_inputs(features, targets, "select")
    C, m, _ = F.shape
    s = _budget(s, m, "select", optional=False)
    seed = V.seed(seed, where="select")
    ridge = V.nonnegative(ridge, "ridge", "pass the ridge λ ≥ 0 of the leverage scores (relative to the mean diagonal)",
                          where="select")
    feats, targs, coefs, chosen = [], [], [], []
    for c in range(C):
        gen = np.random.default_rng([seed, c])
        idx = _select(F[c], s, method, gen, ridge)
        idx_t = torch.tensor(idx, dtype=torch.long)
        feats.append(F[c][idx_t])
        targs.append(Y[idx_t, c])
        coefs.append(torch.eye(m, dtype=torch.float64)[:, idx_t])
        chosen.append(idx)
    return DistilledGradients(feats, targs, coefs, {"method": method, "s": [s] * C, "indices": chosen, "seed": seed})
