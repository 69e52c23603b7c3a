"""Target-aware gradient distillation: the synthetic gradients that reproduce one regression.

Per class c the kernel model is linear in the features, f_c(x) = φ_c(x)ᵀ w_c with w_c = Φ_cᵀ α_c,
α_c = (K_c + λI)⁻¹ y_c (features already scaled by √ν_c, absolute ridge λ — the convention of every
stage-3 kernel model). Inside Algorithm 1's convention (φ̂ = Φᵀu, ŷ = uᵀy) the single unit vector

    u = α_c / ‖α_c‖

reproduces that model *exactly* with the same ridge: the one-point KRR predicts
φ(x)ᵀφ̂ (φ̂ᵀφ̂ + λ)⁻¹ ŷ = φ(x)ᵀw · αᵀy / (αᵀKα + λ‖α‖²) = φ(x)ᵀw, since αᵀ(K + λI)α = αᵀy.
So s = 1 suffices for the regression it was built from — which is why fidelity on the distillation
targets cannot show whether a compressed kernel serves any other question (see
:mod:`dntk.gradients.kernel_metrics`).

- ``target-direction`` with s > 1: u_1 = α/‖α‖, then the Krylov (partial-least-squares) directions
  K y, K² y, … orthonormalised against the previous ones — the directions along which y is best
  explained, one target at a time.
- ``hybrid``: u_1 = α/‖α‖ plus Algorithm 1's s − 1 synthetic directions (budget mode) orthonormalised
  against it (same span), so a user gets the regression exactly at every s *and* the spectrum's leading
  local–global structure.
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
