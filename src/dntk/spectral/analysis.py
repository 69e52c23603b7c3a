"""Spectral analysis of per-class NTK kernels (paper §3, Definitions 3.1–3.2, Properties A and B).

Kernels are float64 [C, m, m] (``K_c = Φ_c Φ_cᵀ`` with dntk's normalised features) or [m, m].
Eigenvalues are returned in descending order. The ε-truncation rank is the smallest r with
Σ_{i≤r} λ_i ≥ (1 − ε) Σ_i λ_i (ε = 1 − τ_v); the data are (κ, ε)-redundant when r_ε ≤ N/κ, i.e.
κ = ⌊N / r_ε⌋.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .. import validate as V
from ..errors import DNTKError


def _sym(K: torch.Tensor) -> torch.Tensor:
    K = K.detach().double().cpu()
    return (K + K.transpose(-1, -2)) / 2


def check_kernel(K, what: str = "kernel") -> torch.Tensor:
    """K [m, m] or [C, m, m] (tensor or numpy array; square, non-empty, finite) → symmetrised float64."""
    return _sym(V.kernel(K, what))


def eigh_desc(K) -> tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues [..., m] descending, eigenvectors [..., m, m] as columns) of a symmetric kernel
    K [m, m] or [C, m, m] (tensor or numpy array; square, non-empty, finite)."""
    lam, vec = torch.linalg.eigh(_sym(V.kernel(K, "K", where="eigh_desc")))
    return lam.flip(-1), vec.flip(-1)


def check_tau(tau: float, name: str):
    if not isinstance(tau, (int, float, np.floating)) or isinstance(tau, bool) or not (0 < tau <= 1):
        raise DNTKError(f"{name}={tau} must lie in (0, 1]")


def truncation_rank(eigenvalues: torch.Tensor, tau_v: float = 0.95) -> int | list[int]:
    """Smallest r whose top-r eigenvalues explain ≥ τ_v of the trace (negative round-off clipped).
    eigenvalues [m] → int, or [C, m] → list of C ints."""
    check_tau(tau_v, "tau_v")
    lam = V.tensor(eigenvalues, "eigenvalues", ndim=(1, 2), where="truncation_rank").double().clamp_min(0)
    if lam.dim() == 2:
        return [truncation_rank(l, tau_v) for l in lam]
    total = float(lam.sum())
    if total <= 0:
        return 0
    cum = torch.cumsum(lam, 0) / total
    return int(torch.searchsorted(cum, torch.tensor(tau_v - 1e-12, dtype=cum.dtype)).item()) + 1


def data_redundancy(eigenvalues: torch.Tensor, eps: float = 0.05) -> dict:
    """Definition 3.1: per class, the ε-truncation rank r and κ = ⌊N / r⌋ ((κ, ε)-redundancy)."""
    lam = V.tensor(eigenvalues, "eigenvalues", ndim=(1, 2), where="data_redundancy")
    lam = lam if lam.dim() == 2 else lam[None]
    ranks = truncation_rank(lam, 1 - eps)
    N = lam.shape[1]
    return {"eps": eps, "N": N, "ranks": ranks, "redundancy": [N // r if r else None for r in ranks]}


def own_class_blocks(K: torch.Tensor, labels: torch.Tensor) -> list[torch.Tensor]:
    """The C own-class blocks K_c[I_c, I_c] (I_c = points labelled c) of per-class kernels [C, m, m];
    labels [m] (or [m, 1]) in 0..C−1."""
    K = V.kernel(K, "K", where="own_class_blocks")
    if K.dim() != 3:
        raise DNTKError(f"own_class_blocks: K must be per-class kernels [C, m, m], got shape {tuple(K.shape)}")
    labels = V.labels(labels, "labels", n=K.shape[1], C=K.shape[0], where="own_class_blocks")
    return [K[c][labels == c][:, labels == c] for c in range(K.shape[0])]


def parameter_redundancy(exact: torch.Tensor, projected: dict) -> list[dict]:
    """Definition 3.2 measured: inner-product distortion of projections of dimension k.

    exact: [C, n, n] exact kernel; projected: {k: [C, n, n]}. Per k: the largest and mean
    |K̂_ij − K_ij| / √(K_ii K_jj) (distortion of cosine-normalised inner products) and the relative
    Frobenius error."""
    E = check_kernel(exact, "exact kernel")
    d = torch.sqrt(torch.diagonal(E, dim1=-2, dim2=-1).clamp_min(1e-300))
    norm = d[..., :, None] * d[..., None, :]
    rows = []
    for k, Kp in sorted(projected.items()):
        dist = (check_kernel(Kp, "projected kernel") - E).abs() / norm
        rel = ((Kp.double() - E).flatten(1).norm(dim=1) / E.flatten(1).norm(dim=1)).mean()
        rows.append({"k": k, "max_distortion": float(dist.max()), "mean_distortion": float(dist.mean()),
                     "relative_error": float(rel)})
    return rows


# --- clustering ---------------------------------------------------------------------------------------
def cluster_kernel(K: torch.Tensor, n_clusters: int, *, method: str = "spectral", seed: int = 0) -> torch.Tensor:
    """Partition the m points of kernel K [m, m] into n_clusters groups; returns labels [m].

    ``spectral``: sklearn SpectralClustering on the cosine-normalised kernel K_ij/√(K_ii K_jj),
    clipped at 0, diagonal zeroed. ``kmeans``: k-means on the rows of the top-H eigenvectors scaled
    by √λ. Both seeded. Empty clusters cannot occur; tiny ones are kept (their local rank is ≤ size).
    """
    K = V.kernel(K, "K", classes=False, where="cluster_kernel")
    m = K.shape[0]
    n_clusters = V.count(n_clusters, "n_clusters", "pass the number of clusters H (an integer ≥ 1)")
    seed = V.seed(seed, where="cluster_kernel")
    if n_clusters > m:
        raise DNTKError(f"n_clusters={n_clusters} is more than the {m} points; use at most {m} clusters")
    if n_clusters == 1:
        return torch.zeros(m, dtype=torch.long)
    K = _sym(K)
    if method == "spectral":
        from sklearn.cluster import SpectralClustering

        d = torch.sqrt(torch.diagonal(K).clamp_min(1e-300))
        A = (K / d[:, None] / d[None, :]).clamp_min(0)
        A.fill_diagonal_(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "graph is not fully connected" is informative only
            labels = SpectralClustering(n_clusters, affinity="precomputed", random_state=seed,
                                        assign_labels="cluster_qr").fit_predict(A.numpy())
    elif method == "kmeans":
        from sklearn.cluster import KMeans

        lam, vec = eigh_desc(K)
        emb = (vec[:, :n_clusters] * lam[:n_clusters].clamp_min(0).sqrt()).numpy()
        labels = KMeans(n_clusters, n_init=10, random_state=seed).fit_predict(emb)
    else:
        raise DNTKError(f"unknown clustering {method!r}; use 'spectral' or 'kmeans'")
    # relabel so that cluster ids are 0..H'-1 in order of first appearance (some may merge)
    _, labels = np.unique(labels, return_inverse=True)
    return torch.from_numpy(labels).long()


# --- local–global structure ------------------------------------------------------------------------------
@dataclass
class LocalGlobal:
    """Eigen-structure of one kernel and its clusters.

    global_values [m], global_vectors [m, m] (columns, descending); r_g: global truncation rank;
    clusters: labels [m]; local: per cluster (indices [m_i], values [m_i], vectors [m_i, m_i], r_i).
    """

    K: torch.Tensor
    global_values: torch.Tensor
    global_vectors: torch.Tensor
    r_g: int
    clusters: torch.Tensor
    local: list

    @property
    def n_clusters(self) -> int:
        return len(self.local)


def local_global_structure(K: torch.Tensor, n_clusters: int, tau_v: float = 0.95, *, clustering: str = "spectral",
                           seed: int = 0) -> LocalGlobal:
    K = check_kernel(K)
    if K.dim() != 2:
        raise DNTKError("local_global_structure takes one kernel [m, m]")
    check_tau(tau_v, "tau_v")
    lam, vec = eigh_desc(K)
    r_g = truncation_rank(lam, tau_v)
    labels = cluster_kernel(K, n_clusters, method=clustering, seed=seed)
    local = []
    for i in range(int(labels.max()) + 1):
        idx = torch.nonzero(labels == i).flatten()
        li, vi = eigh_desc(K[idx][:, idx])
        local.append({"indices": idx, "values": li, "vectors": vi, "rank": max(1, truncation_rank(li, tau_v))})
    return LocalGlobal(K, lam, vec, r_g, labels, local)


def alignment_matrix(s: LocalGlobal, r: int | None = None) -> torch.Tensor:
    """A[i, j] = ‖P_i(u^j|_{I_i})‖² for the first r global eigenvectors (default r_g): the energy of
    global direction j captured by cluster i's top-r_i local eigenspace. [H, r]."""
    r = s.r_g if r is None else r
    U = s.global_vectors[:, :r]
    rows = []
    for loc in s.local:
        Ui = loc["vectors"][:, : loc["rank"]]
        rows.append(((Ui.T @ U[loc["indices"]]) ** 2).sum(0))
    return torch.stack(rows)


def coverage(s: LocalGlobal, mode: str = "union", r: int | None = None) -> torch.Tensor:
    """Coverage c_j of the first r global directions [r].

    ``union``: Σ_i ‖P_i u^j|_{I_i}‖² = ‖P_∪ u^j‖² (the zero-padded local spaces of disjoint
    clusters are orthogonal). ``best``: max_i ‖P_i u^j|_{I_i}‖² / ‖u^j|_{I_i}‖² (best single
    cluster, normalised — the reviewers' variant)."""
    A = alignment_matrix(s, r)
    if mode == "union":
        return A.sum(0)
    if mode == "best":
        r = A.shape[1]
        U = s.global_vectors[:, :r]
        mass = torch.stack([(U[loc["indices"]] ** 2).sum(0) for loc in s.local]).clamp_min(1e-300)
        return (A / mass).max(0).values
    raise DNTKError(f"unknown coverage {mode!r}; use 'union' or 'best'")


def containment_curves(s: LocalGlobal, r_max: int | None = None) -> torch.Tensor:
    """Property A: for each cluster i and r = 1..r_max, the variance-weighted fraction of its local
    eigenvectors (j ≤ r_i, zero-padded) inside the span of the first r global eigenvectors:
    Σ_j λ_ij ‖U_rᵀ ũ_ij‖² / Σ_j λ_ij. Returns [H, r_max]."""
    m = s.K.shape[0]
    r_max = min(m, r_max or 2 * s.r_g)
    U = s.global_vectors[:, :r_max]
    out = []
    for loc in s.local:
        ri = loc["rank"]
        w = loc["values"][:ri].clamp_min(0)
        proj = (U[loc["indices"]].T @ loc["vectors"][:, :ri]) ** 2          # [r_max, r_i]
        frac = (torch.cumsum(proj, 0) * w).sum(1) / w.sum().clamp_min(1e-300)
        out.append(frac)
    return torch.stack(out)


def variance_heatmap(s: LocalGlobal, r: int | None = None) -> torch.Tensor:
    """H[i, j] = (u^j|_{I_i})ᵀ K_i (u^j|_{I_i}) / tr(K_i) for the first r global directions. [H, r]"""
    r = s.r_g if r is None else r
    U = s.global_vectors[:, :r]
    rows = []
    for loc in s.local:
        idx = loc["indices"]
        Ki = s.K[idx][:, idx]
        Ui = U[idx]
        rows.append(((Ui * (Ki @ Ui)).sum(0)) / torch.trace(Ki).clamp_min(1e-300))
    return torch.stack(rows)


def coverage_gap(s: LocalGlobal, tau_g: float = 0.9, mode: str = "union") -> dict:
    """Property B summary at the truncation rank: the gap set G = {j ≤ r_g : c_j < τ_g}, the
    fraction of global variance in G, and the variance-weighted uncovered fraction
    Σ_{j≤r_g} λ_j (1 − c_j) / Σ_{j≤r_g} λ_j."""
    check_tau(tau_g, "tau_g")
    c = coverage(s, mode)
    lam = s.global_values[: s.r_g].clamp_min(0)
    gap = torch.nonzero(c < tau_g).flatten()
    total = float(lam.sum()) or 1.0
    A = alignment_matrix(s)
    return {"r_g": s.r_g, "gap_directions": gap.tolist(), "gap_variance_fraction": float(lam[gap].sum()) / total,
            "uncovered_variance_fraction": float((lam * (1 - c.clamp(0, 1))).sum()) / total,
            "coverage": c.tolist(), "max_alignment": A.max(0).values.tolist(), "mean_alignment": A.mean(0).tolist()}

