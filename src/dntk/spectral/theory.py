"""The paper's subspace diagnostics on measured tangent features (paper.md, theory section).

For one logit c, let g = φ_c(x) be the (projected) tangent feature of a real image x, Σ_g = E[g gᵀ]
its second-moment matrix over a set of real images, and V the span of the tangent features of the
training points (a distilled set, a real subset, or the top-d PCA directions of Σ_g), d = dim V.

- Proposition 3.6 (energy-gap decomposition):
  tr((I − Π_V) Σ_g) = Σ_{i>d} λ_i(Σ_g)  +  [Σ_{i≤d} λ_i(Σ_g) − tr(Π_V Σ_g)]
                      (PCA tail, irreducible at dimension d) + (misalignment gap, ≥ 0, zero iff V is the
                      top-d PCA subspace).
- Theorem 3.3's projection residual is E‖(I − Π_V) g‖² = tr((I − Π_V) Σ_g) on *held-out* gradients
  (Σ_g of images the training points were not chosen from).

All quantities are reported as fractions of tr Σ_g (so classes are comparable). float64 throughout.
"""

from __future__ import annotations

import torch

from ..errors import DNTKError


def row_basis(A: torch.Tensor, tol: float = 1e-10) -> torch.Tensor:
    """Orthonormal basis [k, d] of the row span of A [s, k] (singular values above tol·max)."""
    if A.shape[0] == 0:
        return torch.zeros(A.shape[1], 0, dtype=A.dtype, device=A.device)
    _, sv, Vh = torch.linalg.svd(A, full_matrices=False)
    keep = sv > tol * float(sv.max()) if float(sv.max()) > 0 else torch.zeros_like(sv, dtype=torch.bool)
    return Vh[keep].T


def second_moment_spectrum(G: torch.Tensor) -> torch.Tensor:
    """Eigenvalues (descending, float64 [min(n, k)]) of Σ_g = GᵀG / n for gradients G [n, k] — from the
    smaller of the n × n and k × k Gram matrices."""
    G = G.double()
    n, k = G.shape
    M = (G @ G.T) if n <= k else (G.T @ G)
    return torch.linalg.eigvalsh(M / n).flip(0).clamp_min(0)


def energy_gap(G: torch.Tensor, V: torch.Tensor, *, spectrum: torch.Tensor | None = None) -> dict:
    """Proposition 3.6 for gradients G [n, k] (rows: tangent features of real images, defining Σ_g =
    GᵀG/n) and the subspace spanned by the rows of V [s, k]. spectrum: second_moment_spectrum(G) if
    already computed (it depends on G only). Returns fractions of tr Σ_g: ``residual`` = tr((I−Π_V)Σ_g),
    ``pca_tail`` = Σ_{i>d} λ_i, ``gap`` = residual − pca_tail (≥ 0 up to rounding), and ``dim`` = d."""
    if G.dim() != 2 or V.dim() != 2 or G.shape[1] != V.shape[1]:
        raise DNTKError(f"G must be [n, k] and V [s, k] with the same k, got {tuple(G.shape)} and {tuple(V.shape)}")
    G = G.double()
    lam = second_moment_spectrum(G) if spectrum is None else spectrum.double()
    total = float(lam.sum())
    trace = float((G * G).sum()) / G.shape[0]
    if spectrum is not None and abs(total - trace) > 1e-6 * max(trace, 1e-300):
        raise DNTKError(f"spectrum sums to {total:.6g} but tr(GᵀG/n) = {trace:.6g}: it belongs to other gradients")
    if not total > 0:
        raise DNTKError("the gradients are all zero: tr Σ_g = 0")
    Q = row_basis(V.double())
    d = Q.shape[1]
    captured = float(((G @ Q) ** 2).sum()) / G.shape[0]          # tr(Π_V Σ_g)
    residual = (total - captured) / total
    tail = float(lam[d:].sum()) / total
    return {"residual": residual, "pca_tail": tail, "gap": residual - tail, "dim": d}


def top_pca_directions(G: torch.Tensor, d: int) -> torch.Tensor:
    """The top-d eigenvectors of Σ_g = GᵀG/n as rows [d, k] (the subspace with zero gap)."""
    G = G.double()
    if G.shape[0] > G.shape[1]:        # eigenvectors of the k × k second moment: cheaper than the n × k SVD
        _, vec = torch.linalg.eigh(G.T @ G)
        return vec.flip(1)[:, :d].T.contiguous()
    _, _, Vh = torch.linalg.svd(G, full_matrices=False)
    return Vh[:d]


def subspace_diagnostics(G: torch.Tensor, G_heldout: torch.Tensor, V: torch.Tensor | None, *,
                         labels_heldout: torch.Tensor, labels_V: torch.Tensor | None = None, pca_dim: int | None = None,
                         spectrum: torch.Tensor | None = None) -> dict:
    """Proposition 3.6 and Theorem 3.3 for one logit and one subspace.

    G [n, k]: real-image tangent features estimating Σ_g; G_heldout [n', k]: tangent features of other
    real images (labels_heldout [n']); V [s, k]: the training points' tangent features (labels_V [s]),
    or None with ``pca_dim`` = d for the top-d PCA subspace of Σ_g (estimated from G, so it is *not*
    the optimum on G_heldout). Returns fractions (float64):

    - ``residual``, ``pca_tail``, ``gap``, ``dim``: Proposition 3.6 on Σ_g of G (:func:`energy_gap`);
    - ``heldout_residual``: Theorem 3.3's projection residual E‖(I − Π_V) g‖² / E‖g‖² on G_heldout;
    - ``task_residual`` / ``task_misalignment``: the same two terms of Theorem 3.3 for the tasks "class y's
      mean gradient" g_t = mean of G_heldout over class y, with the distilled step g_D̃ = mean of V's rows
      of class y (η = 1/L): mean over classes of ‖(I − Π_V) g_t‖² / ‖g_t‖² and ‖g_D̃ − Π_V g_t‖² / ‖g_t‖²
      (misalignment None for the PCA subspace, which has no points of its own).
    """
    G, G_heldout = G.double(), G_heldout.double()
    if V is None:
        if pca_dim is None:
            raise DNTKError("pass V (the training points' features) or pca_dim (the PCA subspace's dimension)")
        V = top_pca_directions(G, pca_dim)
        own = False
    else:
        V = V.double()
        own = True
        if labels_V is None or labels_V.shape[0] != V.shape[0]:
            raise DNTKError("labels_V [s] must label every row of V")
    out = energy_gap(G, V, spectrum=spectrum)
    Q = row_basis(V)
    held = float((G_heldout ** 2).sum())
    out["heldout_residual"] = (held - float(((G_heldout @ Q) ** 2).sum())) / held if held > 0 else float("nan")
    res, mis = [], []
    for y in torch.unique(labels_heldout).tolist():
        g = G_heldout[labels_heldout == y].mean(0)
        norm = float(g @ g)
        if norm == 0:
            continue
        proj = Q @ (Q.T @ g)
        res.append(float(((g - proj) ** 2).sum()) / norm)
        if own and bool((labels_V == y).any()):
            gd = V[labels_V == y].mean(0)
            mis.append(float(((gd - proj) ** 2).sum()) / norm)
    out["task_residual"] = sum(res) / len(res) if res else float("nan")
    out["task_misalignment"] = sum(mis) / len(mis) if mis else None
    return out
