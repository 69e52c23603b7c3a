"""Per-class kernel ridge regression f_K,c(x) = k_c(x, X)(K_c + λI)⁻¹ y_c — the kernel model whose
faithfulness to the network dntk measures.

One independent regression per logit c, on that logit's kernel K_c = Φ_c Φ_cᵀ (cross-logit blocks
are ignored, as in the paper). With ``normalize="trace"`` each class's train and test kernels are
divided by ν_c = mean diagonal of the training kernel, so the ridge λ is relative; with
``normalize=None`` the raw kernel and an absolute ridge are used.

Forms (all float64):
- dual: solve the m×m system (K_c/ν_c + λI) α = y_c by Cholesky;
- primal/Woodbury: w = (Φᵀ Φ/ν + λI)⁻¹ Φᵀ y/ν, a k×k system, when k < m;
- rank r: the eigendecomposition of the smaller Gram (K/ν = U Λ Uᵀ) keeps the top r directions,
  α_r = U_r (Λ_r + λ)⁻¹ U_rᵀ y — the paper's best rank-r Woodbury predictor (Figure 5).
Fallback: if Cholesky fails (the regularised kernel is not numerically positive definite), the
solve uses the eigendecomposition and drops directions with Λ + λ ≤ 1e-12·max, with a warning.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .. import validate as V
from ..errors import DNTKError
from ..features.result import FeatureResult
from .normalisation import class_scale


@dataclass
class _ClassFit:
    nu: float
    form: str                              # "dual" | "primal" | "kernel"
    train: torch.Tensor                    # Φ [m, k] (dual/primal) or K [m, m] (kernel)
    y: torch.Tensor                        # [m]
    coef: torch.Tensor                     # α [m] (dual/kernel) or w [k] (primal)
    eig: tuple | None = None               # (Λ desc [r], vectors [m or k, r], vectorsᵀ·rhs [r])


def _as_class_list(x, what: str, dims: int):
    """C per-class tensors from a tensor/numpy array [C, ...] (``dims`` + 1 dimensions), a FeatureResult
    or a list of C tensors/arrays (each finite)."""
    if isinstance(x, FeatureResult):
        x = x.features
    if isinstance(x, (torch.Tensor, np.ndarray)):
        x = V.tensor(x, what, ndim=dims + 1, finite=False, nonempty=False)
        items = [x[c] for c in range(x.shape[0])]
    elif isinstance(x, (list, tuple)) and x and all(isinstance(t, (torch.Tensor, np.ndarray)) for t in x):
        items = [V.tensor(t, f"{what}[{c}]", ndim=dims, finite=False, nonempty=False) for c, t in enumerate(x)]
    else:
        raise DNTKError(f"{what} must be a tensor or numpy array [C, ...] or a list of C tensors, got {type(x).__name__}")
    if not items:
        raise DNTKError(f"{what} holds no class (C = 0); pass at least one class's {what}")
    return items


def _targets_per_class(targets, C: int, sizes: list[int], device="cpu"):
    if isinstance(targets, (torch.Tensor, np.ndarray)) and np.ndim(targets) == 2:
        targets = V.tensor(targets, "targets", ndim=2, finite=False, nonempty=False)
        if targets.shape[1] != C:
            raise DNTKError(f"targets have {targets.shape[1]} columns but there are C={C} class kernels; pass targets [m, C]")
        ys = [targets[:, c] for c in range(C)]
    else:
        ys = _as_class_list(targets, "targets", 1)
    if len(ys) != C:
        raise DNTKError(f"got {len(ys)} target vectors for C={C} classes; pass targets [m, C] or C vectors [m_c]")
    for c, (y, m) in enumerate(zip(ys, sizes)):
        if y.shape[0] != m:
            raise DNTKError(f"class {c}: {m} training points but {y.shape[0]} targets")
        _check_finite(y, f"targets of class {c}", "check the targets (teacher logits or labels) for missing values")
    return [y.detach().double().to(device) for y in ys]


def _check_finite(t: torch.Tensor, what: str, fix: str = "recompute the features (see gradient_features' sample check)"):
    if not bool(torch.isfinite(t).all()):
        bad = torch.nonzero(~torch.isfinite(t).reshape(t.shape[0], -1).all(1)).flatten().tolist() if t.dim() else [0]
        raise DNTKError(f"{what} contains NaN or inf (rows {bad[:10]}{' …' if len(bad) > 10 else ''}); {fix}")


UNIT_ROUNDOFF = 2.220446049250313e-16   # float64
WARN_CONDITION = 1e-3 / UNIT_ROUNDOFF    # ≈ 4.5e12: beyond it fewer than 3 digits of a solution are guaranteed


def _warn_condition(c, cond: float, ridge: float, how: str, stacklevel: int = 4) -> None:
    """One RuntimeWarning when a solve's condition number makes its float64 result unreliable."""
    if cond < WARN_CONDITION:
        return
    bound = "unbounded" if cond == float("inf") else f"≈ {min(cond * UNIT_ROUNDOFF, float('inf')):.2g}"
    warnings.warn(f"class {c}: the regularised system (kernel + ridge={ridge:g}·I) has condition number "
                  f"{'inf (singular)' if cond == float('inf') else f'≈ {cond:.3g}'} ({how}); its float64 solution's "
                  f"relative error can reach {bound} (cond × 2.2e-16), i.e. it may be meaningless — increase the ridge "
                  f"(e.g. to 1e-10 of the largest eigenvalue or more) or remove duplicate training points",
                  RuntimeWarning, stacklevel=stacklevel)


def _condition_estimate(M: torch.Tensor, L: torch.Tensor, iters: int = 30) -> float:
    """A lower bound on cond₂(M) for a symmetric positive-definite M with Cholesky factor L (M = L Lᵀ):
    the larger of (max L_ii / min L_ii)² and λ̂_max / λ̂_min from ``iters`` steps of power iteration on M
    and of inverse iteration with L (cost 2·iters matrix–vector products and triangular solves, O(m²) each
    next to the m³/3 of the factorisation). Exact to a few percent when the extreme eigenvalues are
    separated; in float64 it cannot exceed ≈ 1/u ≈ 4.5e15 by much (the floor of any float64 estimate: an
    eigenvalue below u·λ_max is round-off of the factorisation)."""
    d = torch.diagonal(L).abs()
    est = float((d.max() / d.min()) ** 2) if float(d.min()) > 0 else float("inf")
    gen = torch.Generator().manual_seed(0)   # deterministic, and the global RNG is left alone
    v = torch.randn(M.shape[0], 1, generator=gen, dtype=M.dtype).to(M.device)
    w = v.clone()
    hi = lo_inv = 0.0
    for _ in range(iters):
        v = M @ v
        hi = float(v.norm())
        v = v / max(hi, 1e-300)
        w = torch.cholesky_solve(w, L)
        lo_inv = float(w.norm())
        w = w / max(lo_inv, 1e-300)
    if hi > 0 and lo_inv > 0:
        est = max(est, hi * lo_inv)
    return est


def solve_regularised(A: torch.Tensor, rhs: torch.Tensor, ridge: float, c=0):
    """x = (A + λI)⁻¹ rhs for symmetric PSD A [n, n] and rhs [n], float64, by Cholesky.

    Numerically honest: when the estimated condition number of A + λI (:func:`_condition_estimate`, a
    lower bound, floored by float64 at ≈ 4.5e15) exceeds ≈ 4.5e12 — fewer than three digits of x are
    then guaranteed — or the backward error ‖(A + λI)x − rhs‖ / (‖A + λI‖‖x‖ + ‖rhs‖) exceeds 1e-8, a
    RuntimeWarning reports it. When Cholesky fails (not numerically positive definite), the solve uses
    the eigendecomposition, drops directions with eigenvalue + λ ≤ 1e-12·max, and warns with the true
    condition number. Returns (x [n], eig or None) with eig = (Λ descending, vectors, vectorsᵀ·rhs)."""
    n = A.shape[0]
    M = A + ridge * torch.eye(n, dtype=A.dtype, device=A.device)
    L, info = torch.linalg.cholesky_ex(M)
    if int(info) == 0:
        x = torch.cholesky_solve(rhs[:, None], L)[:, 0]
        cond = _condition_estimate(M, L)
        scale = float(torch.linalg.matrix_norm(M, 2)) if n <= 64 else float(M.abs().sum(0).max())
        back = float((M @ x - rhs).norm()) / max(scale * float(x.norm()) + float(rhs.norm()), 1e-300)
        if back > 1e-8:
            cond = max(cond, 1 / UNIT_ROUNDOFF)
        _warn_condition(c, cond, ridge, f"estimated from below; backward error {back:.1e}")
        return x, None
    lam, vec = torch.linalg.eigh((A + A.T) / 2)
    lam, vec = lam.flip(0), vec.flip(1)  # descending
    eig = (lam, vec, vec.T @ rhs)
    d = lam + ridge
    lo, hi = float(d[-1]), float(d[0])
    cond = hi / lo if lo > 0 else float("inf")
    warnings.warn(f"class {c}: kernel + ridge is not numerically positive definite (Cholesky failed; eigenvalues + ridge "
                  f"span {lo:.3g}..{hi:.3g}, condition number {'inf' if lo <= 0 else f'{cond:.3g}'}); solving by "
                  "eigendecomposition and dropping directions with eigenvalue + ridge ≤ 1e-12·max. "
                  "Increase the ridge to avoid this.", RuntimeWarning, stacklevel=3)
    keep = d > 1e-12 * float(d.abs().max())
    return vec[:, keep] @ (eig[2][keep] / d[keep]), eig


def one_hot(labels, C: int) -> torch.Tensor:
    """float64 [n, C] one-hot targets (the option to regress labels instead of teacher logits) of class
    indices labels [n] or [n, 1] in 0..C−1 (tensor, numpy array or list)."""
    C = V.count(C, "C", "pass the number of classes", where="one_hot")
    return torch.nn.functional.one_hot(V.labels(labels, "labels", C=C, where="one_hot"), C).double()


class PerClassKRR:
    """Per-class kernel ridge regression, scikit-learn style.

    Args:
        ridge: λ (relative to the mean diagonal when normalize="trace").
        normalize: "trace" or None.
        rank: keep only the top-``rank`` eigen-directions of each class kernel (None = all).
        form: "auto" (primal when k < m, else dual), "dual" or "primal".
        device: where the float64 solves run (default CPU; e.g. "cuda"); predictions return on the CPU.

    Fitted attributes: ``classes_`` (C), ``fits_`` (per-class solutions), ``scale_`` (ν_c, [C]).
    """

    def __init__(self, ridge: float = 1e-4, normalize: str | None = "trace", rank: int | None = None, form: str = "auto",
                 device=None):
        ridge = V.nonnegative(ridge, "ridge", "pass λ ≥ 0 (relative to the mean diagonal when normalize='trace')",
                              where="PerClassKRR")
        if normalize not in ("trace", None):
            raise DNTKError(f"normalize must be 'trace' or None, got {normalize!r}")
        if rank is not None:
            rank = V.count(rank, "rank", "pass the number of eigen-directions to keep, or None for all",
                           where="PerClassKRR")
        if form not in ("auto", "dual", "primal"):
            raise DNTKError(f"form must be 'auto', 'dual' or 'primal', got {form!r}")
        self.ridge, self.normalize, self.rank, self.form = ridge, normalize, rank, form
        self.device = torch.device(device if device is not None else "cpu")

    # -- fitting -------------------------------------------------------------------------------------
    def fit(self, features, targets) -> "PerClassKRR":
        """features: [C, m, k] (a tensor, a FeatureResult, or a list of C tensors [m_c, k]); targets: [m, C] teacher logits
        (or one-hot labels, or a list of C vectors [m_c]). Returns self."""
        phis = [f.detach().double().to(self.device) for f in _as_class_list(features, "features", 2)]
        for c, f in enumerate(phis):
            if f.shape[0] == 0 or f.shape[1] == 0:
                raise DNTKError(f"features of class {c} are empty (shape {tuple(f.shape)}); pass at least one training "
                                "point with k ≥ 1 features")
            _check_finite(f, f"features of class {c}")
        ys = _targets_per_class(targets, len(phis), [f.shape[0] for f in phis], self.device)
        self.fits_ = [self._fit_features(c, phi, y) for c, (phi, y) in enumerate(zip(phis, ys))]
        self._finish()
        return self

    def fit_kernel(self, kernels, targets) -> "PerClassKRR":
        """Precomputed kernels: kernels [C, m, m] (e.g. ``dntk.empirical_ntk``), targets [m, C]."""
        Ks = [K.detach().double().to(self.device) for K in _as_class_list(kernels, "kernels", 2)]
        for c, K in enumerate(Ks):
            if K.shape[0] != K.shape[1] or K.shape[0] == 0:
                raise DNTKError(f"training kernel of class {c} must be square and non-empty, got {tuple(K.shape)}")
            _check_finite(K, f"training kernel of class {c}")
        ys = _targets_per_class(targets, len(Ks), [K.shape[0] for K in Ks], self.device)
        self.fits_ = []
        for c, (K, y) in enumerate(zip(Ks, ys)):
            nu = self._scale(c, kernels=K)
            coef, eig = self._solve(c, (K + K.T) / (2 * nu), y)
            self.fits_.append(_ClassFit(nu, "kernel", K, y, coef, eig))
        self._finish()
        return self

    def _finish(self):
        self.classes_ = len(self.fits_)
        self.scale_ = torch.tensor([f.nu for f in self.fits_], dtype=torch.float64)

    def _scale(self, c, **train):
        if self.normalize != "trace":
            return 1.0
        nu = float(class_scale(check=False, **train)[0])
        if not nu > 0:
            raise DNTKError(f"the training kernel of class {c} has a zero diagonal (all gradients vanish); "
                            "check that logit's head is trainable, or drop the class")
        return nu

    def _fit_features(self, c, phi, y):
        m, k = phi.shape
        nu = self._scale(c, features=phi)
        primal = self.form == "primal" or (self.form == "auto" and k < m)
        if primal:
            coef, eig = self._solve(c, phi.T @ phi / nu, phi.T @ y / nu)
            return _ClassFit(nu, "primal", phi, y, coef, eig)
        coef, eig = self._solve(c, phi @ phi.T / nu, y)
        return _ClassFit(nu, "dual", phi, y, coef, eig)

    def _solve(self, c, A, rhs):
        """Solve (A + λI) x = rhs; A symmetric PSD. Returns (x, eig or None)."""
        n = A.shape[0]
        if self.rank is not None:
            if self.rank > n:
                raise DNTKError(f"rank={self.rank} exceeds the size of class {c}'s system ({n}); use rank ≤ {n}")
            eig = self._eig(A, rhs)
            lam, vec, proj = eig
            r = self.rank
            lo, hi = float(lam[r - 1]) + self.ridge, float(lam[0]) + self.ridge
            _warn_condition(c, hi / lo if lo > 0 else float("inf"), self.ridge, f"top {r} eigen-directions, exact",
                            stacklevel=5)
            return vec[:, :r] @ (proj[:r] / (lam[:r] + self.ridge)), eig
        return solve_regularised(A, rhs, self.ridge, c)

    @staticmethod
    def _eig(A, rhs):
        lam, vec = torch.linalg.eigh((A + A.T) / 2)
        lam, vec = lam.flip(0), vec.flip(1)  # descending
        return lam, vec, vec.T @ rhs

    # -- prediction ----------------------------------------------------------------------------------
    def _check_fitted(self):
        if not hasattr(self, "fits_"):
            raise DNTKError("this PerClassKRR is not fitted yet; call fit(features, targets) first")

    def predict(self, features) -> torch.Tensor:
        """features [C, n, k] → predicted logits float64 [n, C]."""
        phis, cols = self._per_class(features, "features"), []
        for c, (fit, phi) in enumerate(zip(self.fits_, phis)):
            if fit.form == "kernel":
                raise DNTKError("this model was fitted on precomputed kernels; use predict_kernel(K_test [C, n, m])")
            phi = phi.detach().double().to(self.device)
            _check_finite(phi, f"test features of class {c}")
            if phi.dim() != 2 or phi.shape[1] != fit.train.shape[1]:
                raise DNTKError(f"test features of class {c} have k={phi.shape[1]}, training features k={fit.train.shape[1]}")
            cols.append(phi @ fit.coef if fit.form == "primal" else (phi @ fit.train.T / fit.nu) @ fit.coef)
        return torch.stack(cols, 1).cpu()

    def predict_kernel(self, kernels) -> torch.Tensor:
        """Precomputed test kernels [C, n, m] (k(x_test, x_train)) → predicted logits [n, C]."""
        Ks, cols = self._per_class(kernels, "test kernels"), []
        for c, (fit, K) in enumerate(zip(self.fits_, Ks)):
            m = fit.train.shape[0]
            _check_finite(K, f"test kernel of class {c}")
            if K.shape[1] != m:
                raise DNTKError(f"test kernel of class {c} has {K.shape[1]} columns, expected m={m} training points")
            if fit.form == "primal":
                raise DNTKError("this model was fitted in primal form; predict_kernel needs form='dual' or fit_kernel")
            cols.append((K.detach().double().to(self.device) / fit.nu) @ fit.coef)
        return torch.stack(cols, 1).cpu()

    def _per_class(self, tests, what: str) -> list:
        """The C per-class test inputs of a fitted model (features [C, n, k] or kernels [C, n, m])."""
        self._check_fitted()
        items = _as_class_list(tests, what, 2)
        self._check_classes(len(items))
        return items

    def _check_classes(self, C):
        if C != self.classes_:
            raise DNTKError(f"got {C} classes at prediction but the model was fitted on {self.classes_}")

    def weights(self) -> torch.Tensor:
        """The linear form of a model fitted on features: W float64 [C, k] with predictions
        f_c(x) = φ_c(x)ᵀ W[c] — the primal solution, or Φ_cᵀ α_c / ν_c for a dual fit."""
        self._check_fitted()
        if any(f.form == "kernel" for f in self.fits_):
            raise DNTKError("a model fitted on precomputed kernels has no feature-space weights")
        return torch.stack([f.coef if f.form == "primal" else f.train.T @ f.coef / f.nu for f in self.fits_]).cpu()

    def train_kernel(self, c: int) -> torch.Tensor:
        """Class c's training kernel (unnormalised) float64 [m, m]."""
        self._check_fitted()
        c = V.count(c, "c", f"pass a class position 0..{self.classes_ - 1}", minimum=0, where="train_kernel")
        if c >= self.classes_:
            raise DNTKError(f"train_kernel: c={c} is out of range for a model fitted on {self.classes_} classes; use "
                            f"0..{self.classes_ - 1}")
        fit = self.fits_[c]
        return (fit.train if fit.form == "kernel" else fit.train @ fit.train.T).cpu()

    # -- sweeps reusing one eigendecomposition --------------------------------------------------------
    def sweep(self, features=None, *, kernels=None, ridges=(1e-4,), ranks=(None,)) -> dict:
        """Predictions [n, C] for every (ridge, rank) pair, from one eigendecomposition per class.

        Pass test ``features`` [C, n, k] (after ``fit``) or test ``kernels`` [C, n, m] (after
        ``fit_kernel``). Returns {(ridge, rank): predictions}; rank None = all directions.
        """
        tests = self._per_class(features if features is not None else kernels, "test features/kernels")
        out = {(lam, r): [] for lam in ridges for r in ranks}
        for c, (fit, t) in enumerate(zip(self.fits_, tests)):
            t = t.detach().double().to(self.device)
            if fit.eig is None:
                if fit.form == "primal":
                    fit.eig = self._eig(fit.train.T @ fit.train / fit.nu, fit.train.T @ fit.y / fit.nu)
                elif fit.form == "dual":
                    fit.eig = self._eig(fit.train @ fit.train.T / fit.nu, fit.y)
                else:
                    fit.eig = self._eig(fit.train / fit.nu, fit.y)
            lam_, vec, proj = fit.eig
            if fit.form == "primal":
                basis = t @ vec                                   # [n, k]
            elif fit.form == "dual":
                basis = (t @ fit.train.T / fit.nu) @ vec          # [n, m]
            else:
                basis = (t / fit.nu) @ vec
            for lam in ridges:
                for r in ranks:
                    rr = lam_.numel() if r is None else r
                    if rr > lam_.numel():
                        raise DNTKError(f"rank {r} exceeds the {lam_.numel()} directions of class {c}")
                    out[(lam, r)].append(basis[:, :rr] @ (proj[:rr] / (lam_[:rr] + lam)))
        return {key: torch.stack(cols, 1).cpu() for key, cols in out.items()}
