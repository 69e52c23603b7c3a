"""Algorithm 1 — local–global gradient distillation (paper §2.4; ../shared/research/paper.md).

Per class kernel K = Φ Φᵀ (dntk features are already scaled by 1/√k, so K needs no 1/k):

1. cluster the m points into H groups (spectral clustering of the cosine-normalised kernel);
2. global eigendecomposition K = U Λ Uᵀ, truncation rank r_g at explained variance τ_v;
3. local eigendecompositions of each K_i = K[I_i, I_i], ranks r_i at τ_v;
4. coverage c_j of each global direction j ≤ r_g by the local spaces (union by default);
5. gap set G = {j ≤ r_g : c_j < τ_g};
6. candidates: the zero-padded local eigenvectors ũ_ij (j ≤ r_i) and the gap vectors u^j, j ∈ G
   (full eigenvectors, or their residual (I − P_∪)u^j renormalised);
7. QR pruning: candidates sorted by kernel energy uᵀKu (= the eigenvalue), a column is kept when
   its component orthogonal to the columns before it is > qr_tol (relative to the largest);
8. synthetic gradients φ̂ = Φᵀu with targets ŷ = uᵀy.

Remark 4.2: ‖φ̂‖² = uᵀΦΦᵀu = λ for a unit eigenvector u of K = ΦΦᵀ (under the paper's
unnormalised projection, K = ΦΦᵀ/k and ‖φ̂‖² = kλ).

With one cluster every local vector is a global eigenvector and nothing is a gap, so the synthetic
set is the top-r_g eigen-directions and KRR on it *is* rank-r_g truncated KRR on all m points
(tests/test_gradients.py checks this to 1e-8).

Budget mode (``budget=s``): exactly s synthetic gradients per class — the top s surviving
candidates by energy; if fewer than s candidates survive, further global eigenvectors (j > r_g) are
added in order.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .. import validate as V
from ..errors import DNTKError
from ..features.result import class_kernels
from ..spectral import check_tau, coverage, eigh_desc, local_global_structure, truncation_rank

MODES = ("per_class", "class_average")


@dataclass
class DistilledGradients:
    """features: C tensors [s_c, k]; targets: C tensors [s_c]; coefficients: C tensors [m, s_c]
    (the unit vectors u, so features[c] = coefficients[c]ᵀ Φ_c); record: per-class diagnostics."""

    features: list
    targets: list
    coefficients: list
    record: dict = field(default_factory=dict)

    @property
    def sizes(self) -> list[int]:
        return [f.shape[0] for f in self.features]


def _check_inputs(features, targets, where: str = "gradient distillation"):
    """features [C, m, k] and targets [m, C] (tensors or numpy arrays, finite) → float64 CPU copies."""
    if hasattr(features, "features") and not isinstance(features, (torch.Tensor, np.ndarray)):
        features = features.features   # a FeatureResult
    F = V.tensor(features, "features", ndim=3, where=where)
    C, m, _ = F.shape
    Y = V.tensor(targets, "targets", ndim=2, finite=False, nonempty=False, where=where)
    if tuple(Y.shape) != (m, C):
        raise DNTKError(f"{where}: targets must be [m={m}, C={C}] (one row per training point), got {tuple(Y.shape)}")
    bad = torch.nonzero(~torch.isfinite(Y).all(1)).flatten().tolist()
    if bad:
        raise DNTKError(f"{where}: targets contain NaN or inf in rows {bad[:10]}{' …' if len(bad) > 10 else ''}; check the "
                        "teacher logits (or labels) those training points got")
    return F.detach().double().cpu(), Y.detach().double().cpu()


def _budget(budget, m: int, where: str, *, optional: bool = True):
    """None (when ``optional``) or an integer budget 1 ≤ s ≤ m."""
    if budget is None and optional:
        return None
    s = V.count(budget, "budget s", "pass the number of synthetic gradients per class kernel (an integer ≥ 1)"
                + (", or None" if optional else ""), where=where)
    if s > m:
        raise DNTKError(f"budget s={s} is larger than the m={m} training gradients; choose s ≤ {m}")
    return s


def _qr_keep(cands: torch.Tensor, tol: float) -> torch.Tensor:
    """Indices of the columns of cands [m, n] (in order) that add a new direction."""
    if cands.shape[1] == 0:
        return torch.zeros(0, dtype=torch.long)
    _, R = torch.linalg.qr(cands, mode="r")
    d = torch.diagonal(R).abs()
    n = min(cands.shape)
    keep = torch.nonzero(d[:n] > tol * float(d[:n].max())).flatten()
    # columns beyond m cannot add a direction (QR has only m pivots)
    return keep


def synthesize(K: torch.Tensor, *, tau_v: float, tau_g: float, n_clusters: int, coverage_mode: str = "union",
               gap: str = "full", budget: int | None = None, qr_tol: float = 1e-6, clustering: str = "spectral",
               seed: int = 0) -> tuple[torch.Tensor, dict]:
    """Coefficient vectors U_syn [m, s] (unit columns) for one kernel K [m, m], and a record."""
    K = V.kernel(K, "K", classes=False, where="synthesize")
    m = K.shape[0]
    budget = _budget(budget, m, "synthesize")
    n_clusters = V.count(n_clusters, "n_clusters", "pass the number of clusters H (an integer ≥ 1)", where="synthesize")
    seed = V.seed(seed, where="synthesize")
    st = local_global_structure(K, n_clusters, tau_v, clustering=clustering, seed=seed)
    U, lam = st.global_vectors, st.global_values
    cols, energy, kinds = [], [], []
    for loc in st.local:
        idx = loc["indices"]
        for j in range(loc["rank"]):
            v = torch.zeros(m, dtype=torch.float64)
            v[idx] = loc["vectors"][:, j]
            cols.append(v)
            energy.append(float(loc["values"][j]))
            kinds.append("local")
    c = coverage(st, coverage_mode)
    gaps = torch.nonzero(c < tau_g).flatten().tolist()
    if gap not in ("full", "residual"):
        raise DNTKError(f"unknown gap representative {gap!r}; use 'full' or 'residual'")
    if gaps:
        Q = torch.stack(cols, 1) if cols else torch.zeros(m, 0, dtype=torch.float64)
    for j in gaps:
        u = U[:, j].clone()
        if gap == "residual":
            u = u - Q @ (Q.T @ u)
            n = float(u.norm())
            if n < 1e-8:
                continue
            u = u / n
            energy.append(float(u @ (K @ u)))
        else:
            energy.append(float(lam[j]))
        cols.append(u)
        kinds.append("gap")
    order = sorted(range(len(cols)), key=lambda i: -energy[i])
    cand = torch.stack([cols[i] for i in order], 1) if cols else torch.zeros(m, 0, dtype=torch.float64)
    keep = _qr_keep(cand, qr_tol)
    chosen = [order[i] for i in keep.tolist()]
    if budget is not None:
        chosen = chosen[:budget]
        extra = st.r_g
        while len(chosen) < budget and extra < m:
            cols.append(U[:, extra].clone())
            energy.append(float(lam[extra]))
            kinds.append("global-fill")
            trial = torch.stack([cols[i] for i in chosen] + [cols[-1]], 1)
            if len(_qr_keep(trial, qr_tol)) == trial.shape[1]:
                chosen.append(len(cols) - 1)
            extra += 1
    U_syn = torch.stack([cols[i] for i in chosen], 1) if chosen else torch.zeros(m, 0, dtype=torch.float64)
    record = {"r_g": st.r_g, "local_ranks": [loc["rank"] for loc in st.local],
              "cluster_sizes": [int(loc["indices"].numel()) for loc in st.local],
              "n_local_candidates": kinds.count("local"), "gap_directions": gaps, "n_gap": len(gaps),
              "s": len(chosen), "kinds": [kinds[i] for i in chosen], "energies": [energy[i] for i in chosen]}
    return U_syn, record


def local_global(features: torch.Tensor, targets: torch.Tensor, *, tau_v: float = 0.95, tau_g: float = 0.9,
                 n_clusters: int = 10, mode: str = "per_class", coverage_mode: str = "union", gap: str = "full",
                 budget: int | None = None, qr_tol: float = 1e-6, clustering: str = "spectral",
                 seed: int = 0) -> DistilledGradients:
    """Algorithm 1 on projected features [C, m, k] with targets [m, C] (teacher logits).

    mode: ``per_class`` (each class kernel gets its own clusters and eigenvectors) or
    ``class_average`` (one run on K̄ = mean_c K_c; the same coefficient vectors for every class).
    Returns :class:`DistilledGradients`, whose ``features``/``targets`` go straight into
    ``PerClassKRR(normalize=None).fit``.
    """
    check_tau(tau_v, "tau_v")
    check_tau(tau_g, "tau_g")
    if mode not in MODES:
        raise DNTKError(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    F, Y = _check_inputs(features, targets, "local_global")
    C, m, _ = F.shape
    budget = _budget(budget, m, "local_global")
    seed = V.seed(seed, where="local_global")
    n_clusters = V.count(n_clusters, "n_clusters", "pass the number of clusters H (an integer ≥ 1)", where="local_global")
    qr_tol = V.nonnegative(qr_tol, "qr_tol", "pass a relative tolerance such as 1e-6", where="local_global")
    if n_clusters > m:
        raise DNTKError(f"n_clusters={n_clusters} is more than the {m} points; use at most {m} clusters")
    kernels = class_kernels(F)
    kw = dict(tau_v=tau_v, tau_g=tau_g, n_clusters=n_clusters, coverage_mode=coverage_mode, gap=gap, budget=budget,
              qr_tol=qr_tol, clustering=clustering, seed=seed)
    feats, targs, coefs, records = [], [], [], []
    if mode == "class_average":
        U_syn, rec = synthesize(kernels.mean(0), **kw)
        per_class = [(U_syn, rec)] * C
    else:
        per_class = [synthesize(kernels[c], **kw) for c in range(C)]
    for c, (U_syn, rec) in enumerate(per_class):
        feats.append(U_syn.T @ F[c])
        targs.append(U_syn.T @ Y[:, c])
        coefs.append(U_syn)
        records.append(rec)
    summary = {"mode": mode, "m": m, "s": [f.shape[0] for f in feats], "tau_v": tau_v, "tau_g": tau_g,
               "n_clusters": n_clusters, "coverage": coverage_mode, "gap": gap, "budget": budget,
               "ranks": [r["r_g"] for r in records], "per_class": records}
    return DistilledGradients(feats, targs, coefs, summary)


def truncation_ranks(features: torch.Tensor, tau_v: float = 0.95) -> list[int]:
    """Global truncation rank of each class kernel Φ_c Φ_cᵀ."""
    F = V.tensor(features, "features", ndim=3, where="truncation_ranks").detach().double().cpu()
    lam, _ = eigh_desc(class_kernels(F))
    return truncation_rank(lam, tau_v)
