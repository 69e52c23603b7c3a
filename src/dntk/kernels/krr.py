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

import torch

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
    if isinstance(x, FeatureResult):
        x = x.features
    if isinstance(x, torch.Tensor):
        if x.dim() != dims + 1:
            raise DNTKError(f"{what} must be [C, ...] with {dims + 1} dimensions, got shape {tuple(x.shape)}")
        return [x[c] for c in range(x.shape[0])]
    if isinstance(x, (list, tuple)) and x and all(isinstance(t, torch.Tensor) for t in x):
        return list(x)
    raise DNTKError(f"{what} must be a tensor [C, ...] or a list of C tensors, got {type(x).__name__}")


def _targets_per_class(targets, C: int, sizes: list[int], device="cpu"):
    if isinstance(targets, torch.Tensor) and targets.dim() == 2:
        if targets.shape[1] != C:
            raise DNTKError(f"targets have {targets.shape[1]} columns but there are C={C} class kernels")
        ys = [targets[:, c] for c in range(C)]
    else:
        ys = _as_class_list(targets, "targets", 0)
    if len(ys) != C:
        raise DNTKError(f"got {len(ys)} target vectors for C={C} classes")
    for c, (y, m) in enumerate(zip(ys, sizes)):
        if y.shape[0] != m:
            raise DNTKError(f"class {c}: {m} training points but {y.shape[0]} targets")
    return [y.detach().double().to(device) for y in ys]


def _check_finite(t: torch.Tensor, what: str):
    if not bool(torch.isfinite(t).all()):
        raise DNTKError(f"{what} contains NaN or inf; recompute the features (see gradient_features' sample check)")


def one_hot(labels: torch.Tensor, C: int) -> torch.Tensor:
    """float64 [n, C] one-hot targets (the option to regress labels instead of teacher logits)."""
    return torch.nn.functional.one_hot(labels.long(), C).double()


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
        if not ridge >= 0:
            raise DNTKError(f"ridge must be ≥ 0, got {ridge}")
        if normalize not in ("trace", None):
            raise DNTKError(f"normalize must be 'trace' or None, got {normalize!r}")
        if rank is not None and (not isinstance(rank, int) or rank < 1):
            raise DNTKError(f"rank must be a positive integer or None, got {rank!r}")
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
            _check_finite(f, f"features of class {c}")
        ys = _targets_per_class(targets, len(phis), [f.shape[0] for f in phis], self.device)
        self.fits_ = [self._fit_features(c, phi, y) for c, (phi, y) in enumerate(zip(phis, ys))]
        self._finish()
        return self

    def fit_kernel(self, kernels, targets) -> "PerClassKRR":
        """Precomputed kernels: kernels [C, m, m] (e.g. ``dntk.empirical_ntk``), targets [m, C]."""
        Ks = [K.detach().double().to(self.device) for K in _as_class_list(kernels, "kernels", 2)]
        for c, K in enumerate(Ks):
            if K.shape[0] != K.shape[1]:
                raise DNTKError(f"training kernel of class {c} must be square, got {tuple(K.shape)}")
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
            return vec[:, :r] @ (proj[:r] / (lam[:r] + self.ridge)), eig
        M = A + self.ridge * torch.eye(n, dtype=A.dtype, device=A.device)
        L, info = torch.linalg.cholesky_ex(M)
        if int(info) == 0:
            return torch.cholesky_solve(rhs[:, None], L)[:, 0], None
        warnings.warn(f"class {c}: kernel + ridge is not numerically positive definite (Cholesky failed); "
                      "solving by eigendecomposition and dropping directions with eigenvalue + ridge ≤ 1e-12·max. "
                      "Increase the ridge to avoid this.", RuntimeWarning, stacklevel=3)
        eig = self._eig(A, rhs)
        lam, vec, proj = eig
        d = lam + self.ridge
        keep = d > 1e-12 * float(d.abs().max())
        return vec[:, keep] @ (proj[keep] / d[keep]), eig

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
            if phi.shape[1] != fit.train.shape[1]:
                raise DNTKError(f"test features of class {c} have k={phi.shape[1]}, training features k={fit.train.shape[1]}")
            cols.append(phi @ fit.coef if fit.form == "primal" else (phi @ fit.train.T / fit.nu) @ fit.coef)
        return torch.stack(cols, 1).cpu()

    def predict_kernel(self, kernels) -> torch.Tensor:
        """Precomputed test kernels [C, n, m] (k(x_test, x_train)) → predicted logits [n, C]."""
        Ks, cols = self._per_class(kernels, "test kernels"), []
        for c, (fit, K) in enumerate(zip(self.fits_, Ks)):
            m = fit.train.shape[0]
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
