"""Target-aware gradient distillation: the synthetic gradients that reproduce one regression.

Per class c the kernel model is linear in the features, f_c(x) = φ_c(x)ᵀ w_c with w_c = Φ_cᵀ α_c,
α_c = (K_c + λI)⁻¹ y_c (features already scaled by √ν_c, absolute ridge λ — the convention of every
stage-3 kernel model). Inside Algorithm 1's convention (φ̂ = Φᵀu, ŷ = uᵀy) the single unit vector

    u = α_c / ‖α_c‖

reproduces that model *exactly* with the same ridge: the one-point KRR predicts
φ(x)ᵀφ̂ (φ̂ᵀφ̂ + λ)⁻¹ ŷ = φ(x)ᵀw · αᵀy / (αᵀKα + λ‖α‖²) = φ(x)ᵀw, since αᵀ(K + λI)α = αᵀy.
So s = 1 suffices for the regression it was built from — which is why fidelity on the distillation
targets cannot show whether a compressed kernel serves any other question (see
:mod:`dntk.gradient_distillation.kernel_metrics`).

- ``target-direction`` with s > 1: u_1 = α/‖α‖, then the Krylov (partial-least-squares) directions
  K y, K² y, … orthonormalised against the previous ones — the directions along which y is best
  explained, one target at a time.
- ``hybrid``: u_1 = α/‖α‖ plus Algorithm 1's s − 1 synthetic directions (budget mode) orthonormalised
  against it (same span), so a user gets the regression exactly at every s *and* the spectrum's leading
  local–global structure.

The spectral baselines (issue #24: the obvious one-eigendecomposition competitor Algorithm 1 was never
compared with):

- ``eigen``: u = the top-s eigenvectors of K_c = Φ_cΦ_cᵀ — by Eckart–Young the synthetic set whose
  compressed *training* kernel Φ P_S Φᵀ = U Λ_s Uᵀ is the best rank-s approximation of K_c (in Frobenius
  and spectral norm). Eigenvectors of eigenvalue ≤ 1e-12·λ_max are not used (s > rank gives rank
  directions, s per class recorded); each sign is fixed so its largest-magnitude entry is positive; at a
  tie λ_s = λ_{s+1} the subspace is not unique and eigh's choice is taken (recorded as ``tied``).
- ``hybrid-eigen``: u_1 = α/‖α‖ and the top s − 1 eigenvectors of (I − u_1u_1ᵀ) K_c (I − u_1u_1ᵀ), which
  are orthogonal to u_1: the all-m regression exactly at every s (as ``target-direction``) *and* the best
  rank-(s − 1) approximation of the kernel on u_1's orthogonal complement.
"""

from __future__ import annotations

import torch

from .. import validate as V
from ..errors import DNTKError
from ..features.result import class_kernels
from .local_global import DistilledGradients, _budget, _check_inputs, local_global


def _alpha(K: torch.Tensor, y: torch.Tensor, ridge: float, c: int = 0) -> torch.Tensor:
    """(K + λI)⁻¹ y in float64 (a RuntimeWarning when the system is too ill-conditioned for float64)."""
    from ..kernels.krr import solve_regularised

    return solve_regularised(K, y, ridge, c)[0]


def _unit(v: torch.Tensor, y: torch.Tensor | None = None, c: int = 0) -> torch.Tensor:
    n = float(v.norm())
    if not n > 0:
        if y is not None and not bool((y != 0).any()):
            raise DNTKError(f"the targets of class {c} are all zero, so its regression is f = 0 and has no target "
                            "direction; check the targets, or use a selection method (random, fps, ...) for that class")
        raise DNTKError(f"the dual solution of class {c}'s regression is zero (its kernel is zero on the targets' "
                        "directions): no target direction exists; check the features of that class")
    return v / n


def _krylov(K: torch.Tensor, first: torch.Tensor, y: torch.Tensor, s: int, tol: float = 1e-10) -> torch.Tensor:
    """[m, s'] orthonormal columns: first, then K^j y (j = 1, 2, …) Gram–Schmidt-orthogonalised; stops
    early when the Krylov space is exhausted."""
    cols = [first]
    v = y
    for _ in range(10 * s):
        if len(cols) == s:
            break
        v = K @ v
        v = v / max(float(v.norm()), 1e-300)
        r = v.clone()
        for _ in range(2):  # twice is enough (Kahan)
            for q in cols:
                r = r - (q @ r) * q
        if float(r.norm()) > tol:
            cols.append(r / r.norm())
    return torch.stack(cols, 1)


def _orthonormal_after(first: torch.Tensor, V: torch.Tensor, tol: float = 1e-10) -> torch.Tensor:
    """[m, s'] orthonormal columns spanning {first} ∪ columns of V, ``first`` (a unit vector) kept as
    column 0: V's columns Gram–Schmidt-orthogonalised against the previous ones, a column whose residual
    is below ``tol`` of its norm dropped. Orthonormality is what makes the hybrid exact: with UᵀU = I and
    α ∈ span(U), (UᵀKU + λI) Uᵀα = Uᵀ(K + λI)α = Uᵀy, so the synthetic model's dual solution is Uᵀα and
    it predicts φᵀΦᵀUUᵀα = φᵀΦᵀα. Algorithm 1's own columns are not orthogonal to α (|u·v| up to 0.27
    measured), and with them the ridge term λ‖·‖² weighs the directions differently: 1e-3–0.14 off."""
    cols = [first]
    for j in range(V.shape[1]):
        v = V[:, j]
        r = v.clone()
        for _ in range(2):  # twice is enough (Kahan)
            for q in cols:
                r = r - (q @ r) * q
        if float(r.norm()) > tol * max(float(v.norm()), 1e-300):
            cols.append(r / r.norm())
    return torch.stack(cols, 1)


def target_direction(features: torch.Tensor, targets: torch.Tensor, s: int = 1, *, ridge: float) -> DistilledGradients:
    """s synthetic gradients per class: the target direction α/‖α‖ and (s > 1) Krylov directions.

    features [C, m, k] (already divided by √ν_c), targets [m, C], ridge: the absolute ridge of the
    kernel model that will be fitted on the synthetic set."""
    F, Y = _check_inputs(features, targets, "target_direction")
    C, m, _ = F.shape
    s = _budget(s, m, "target_direction", optional=False)
    ridge = V.nonnegative(ridge, "ridge", "pass the absolute ridge λ ≥ 0 of the kernel model", where="target_direction")
    K = class_kernels(F)
    feats, targs, coefs = [], [], []
    for c in range(C):
        U = _krylov(K[c], _unit(_alpha(K[c], Y[:, c], ridge, c), Y[:, c], c), Y[:, c], s)
        coefs.append(U)
        feats.append(U.T @ F[c])
        targs.append(U.T @ Y[:, c])
    return DistilledGradients(feats, targs, coefs, {"method": "target-direction", "s": [u.shape[1] for u in coefs],
                                                    "ridge": ridge})


def hybrid(features: torch.Tensor, targets: torch.Tensor, s: int, *, ridge: float, seed: int = 0,
           **local_global_options) -> DistilledGradients:
    """The target direction plus Algorithm 1's s − 1 synthetic gradients (budget mode) per class,
    orthonormalised against it (:func:`_orthonormal_after`), so the all-m regression is reproduced
    exactly at every s; a direction dependent on the previous ones is dropped (s per class recorded)."""
    F, Y = _check_inputs(features, targets, "hybrid")
    C, m, _ = F.shape
    s = _budget(s, m, "hybrid", optional=False)
    ridge = V.nonnegative(ridge, "ridge", "pass the absolute ridge λ ≥ 0 of the kernel model", where="hybrid")
    seed = V.seed(seed, where="hybrid")
    K = class_kernels(F)
    spectral = local_global(F, Y, budget=s - 1, seed=seed, **local_global_options) if s > 1 else None
    feats, targs, coefs = [], [], []
    for c in range(C):
        u = _unit(_alpha(K[c], Y[:, c], ridge, c), Y[:, c], c)
        U = u[:, None] if spectral is None else _orthonormal_after(u, spectral.coefficients[c])
        coefs.append(U)
        feats.append(U.T @ F[c])
        targs.append(U.T @ Y[:, c])
    return DistilledGradients(feats, targs, coefs, {"method": "hybrid", "s": [u.shape[1] for u in coefs],
                                                    "ridge": ridge})


def _top_eigenvectors(K: torch.Tensor, s: int, rtol: float = 1e-12) -> tuple[torch.Tensor, bool]:
    """The top-s eigenvectors [m, s'] of a symmetric PSD K [m, m] (s' ≤ s: only eigenvalues above
    rtol·λ_max), each signed so its largest-|·| entry is positive; and whether λ_s ties λ_{s+1}."""
    lam, vec = torch.linalg.eigh(K)
    lam, vec = lam.flip(0), vec.flip(1)
    top = float(lam[0]) if lam.numel() else 0.0
    keep = min(s, int((lam > rtol * top).sum())) if top > 0 else 0
    U = vec[:, :keep]
    if keep:
        pivot = U.abs().argmax(0)
        U = U * torch.sign(U[pivot, torch.arange(keep)])[None, :]
    tied = keep < lam.numel() and keep > 0 and bool(torch.isclose(lam[keep - 1], lam[keep], rtol=1e-9, atol=0.0))
    return U, tied


def eigen(features: torch.Tensor, targets: torch.Tensor, s: int) -> DistilledGradients:
    """s synthetic gradients per class: Φ_cᵀu for the top-s eigenvectors u of K_c = Φ_cΦ_cᵀ, targets uᵀy.

    features [C, m, k] (already divided by √ν_c), targets [m, C]. The compressed training kernel is the
    Eckart–Young optimum U Λ_s Uᵀ; on other points the top-s eigenvectors are not guaranteed optimal (see
    :func:`dntk.gradient_distillation.kernel_metrics.nystrom_oracle`)."""
    F, Y = _check_inputs(features, targets, "eigen")
    C, m, _ = F.shape
    s = _budget(s, m, "eigen", optional=False)
    K = class_kernels(F)
    feats, targs, coefs, tied = [], [], [], []
    for c in range(C):
        U, tie = _top_eigenvectors(K[c], s)
        if U.shape[1] == 0:
            raise DNTKError(f"eigen: class {c}'s kernel is zero (all its training gradients vanish): no eigenvector "
                            "to keep; check the features of that class")
        coefs.append(U)
        feats.append(U.T @ F[c])
        targs.append(U.T @ Y[:, c])
        tied.append(tie)
    return DistilledGradients(feats, targs, coefs, {"method": "eigen", "s": [u.shape[1] for u in coefs], "tied": tied})


def hybrid_eigen(features: torch.Tensor, targets: torch.Tensor, s: int, *, ridge: float) -> DistilledGradients:
    """The target direction u_1 = α/‖α‖ plus the top s − 1 eigenvectors of the kernel on u_1's orthogonal
    complement, (I − u_1u_1ᵀ)K_c(I − u_1u_1ᵀ), per class: the all-m regression exactly at every s, and of
    the kernel the best rank-(s − 1) part orthogonal to u_1. features [C, m, k], targets [m, C]."""
    F, Y = _check_inputs(features, targets, "hybrid_eigen")
    C, m, _ = F.shape
    s = _budget(s, m, "hybrid_eigen", optional=False)
    ridge = V.nonnegative(ridge, "ridge", "pass the absolute ridge λ ≥ 0 of the kernel model", where="hybrid_eigen")
    K = class_kernels(F)
    feats, targs, coefs, tied = [], [], [], []
    for c in range(C):
        u = _unit(_alpha(K[c], Y[:, c], ridge, c), Y[:, c], c)
        if s > 1:
            P = torch.eye(m, dtype=K.dtype) - torch.outer(u, u)
            rest, tie = _top_eigenvectors(P @ K[c] @ P, s - 1)
            U = _orthonormal_after(u, rest)   # rest ⟂ u already (eigenvectors of nonzero eigenvalue): rounding only
        else:
            U, tie = u[:, None], False
        coefs.append(U)
        feats.append(U.T @ F[c])
        targs.append(U.T @ Y[:, c])
        tied.append(tie)
    return DistilledGradients(feats, targs, coefs, {"method": "hybrid-eigen", "s": [u.shape[1] for u in coefs],
                                                    "ridge": ridge, "tied": tied})
