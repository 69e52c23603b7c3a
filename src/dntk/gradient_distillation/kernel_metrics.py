"""Does a compressed kernel serve questions it was not built for? Kernel-level and held-out-target
measures of a synthetic gradient set against the all-m kernel, on held-out points.

Per class c (features already divided by √ν_c): Φ [m, k] the m training gradients, S = UᵀΦ [s, k] the
synthetic ones (U: the set's coefficient vectors), X [n, k] held-out (test) gradients, λ the ridge.

- **Nyström-type kernel error**: with P_Φ, P_S the orthogonal projections of R^k onto the row spans of
  Φ and S, K_m(x, x') = φ(x)ᵀ P_Φ φ(x') is the all-m kernel restricted to the span of the m gradients
  and K_S(x, x') = φ(x)ᵀ P_S φ(x') the compressed one; error ‖K_S − K_m‖_F / ‖K_m‖_F over the held-out
  points. 0 when S spans what Φ spans; it sees every direction, not only the one a target needs.
- **The optimum lines** (issue #24): on the *training* points the compressed kernel Φ P_S Φᵀ of any s
  synthetic gradients (rows in the span of Φ) is at best the Eckart–Young rank-s approximation of
  K = ΦΦᵀ, error sqrt(Σ_{i>s} λ_i²)/‖K‖_F — reached by the top-s eigenvectors (``eigen``). On the held-out
  points the best s-dimensional S inside span(Φ) for the Nyström error is the top-s right singular
  subspace of X P_Φ (an oracle: it looks at the test gradients), error sqrt(Σ_{i>s} σ_i⁴ / Σ σ_i⁴) with σ
  the singular values of X P_Φ (Cauchy interlacing); the top-s *training* eigenvectors are not guaranteed
  to reach it. ``nystrom_fraction`` = (1 − error) / (1 − oracle error): the share of the achievable
  reduction a method reaches.
- **GP posterior variance**: σ²(x) = φᵀφ − φᵀΦᵀ(ΦΦᵀ + λI)⁻¹Φφ with all m points and σ̂²(x) with S in
  their place; mean |σ̂² − σ²| / σ². The uncertainty a user would report; 0 only if S keeps the
  directions the held-out points need.
- **Principal angles** between the top-r right singular subspaces (in R^k) of Φ and of S (r ≤ s):
  mean cos² (1 = same subspace) and the largest angle in degrees. Whether the leading spectrum survives.
- **Held-out targets**: a synthetic set built for targets y is refitted on targets y' it never saw with
  the same u (ŷ' = Uᵀy') and compared with the all-m model on y' (see :func:`heldout_target_metrics`).

These say what a fidelity on the distillation targets cannot: a single direction can reproduce one
regression exactly (:func:`dntk.gradient_distillation.target_direction`) and still lose the kernel.
"""

from __future__ import annotations

import torch

from .. import metrics
from .. import validate as V
from ..errors import DNTKError
from ..kernels import PerClassKRR
from ..spectral.theory import row_basis as _row_basis


def _classes(F_train, synthetic, F_test):
    F = V.tensor(F_train.features if hasattr(F_train, "features") else F_train, "F_train", ndim=3)
    X = V.tensor(F_test.features if hasattr(F_test, "features") else F_test, "F_test", ndim=3)
    S = synthetic.features if hasattr(synthetic, "features") else synthetic
    S = [V.tensor(s, f"synthetic features[{c}]", ndim=2, nonempty=False) for c, s in enumerate(S)]
    if len(S) != F.shape[0] or X.shape[0] != F.shape[0]:
        raise DNTKError(f"{len(S)} synthetic classes, {F.shape[0]} training and {X.shape[0]} test classes: they must agree")
    return F.double(), [s.double() for s in S], X.double()


class AllM:
    """The all-m side of every comparison below, computed once per (training features, test features,
    ridge) and reused for every synthetic set compared with it: per class the restricted kernel
    X P_Φ Xᵀ, the posterior variance σ², the right singular vectors of Φ, and the all-m model's test
    predictions for each target set."""

    def __init__(self, F_train, F_test, ridge: float = 0.0):
        self.F = (F_train.features if hasattr(F_train, "features") else F_train).double()
        self.X = (F_test.features if hasattr(F_test, "features") else F_test).double()
        self.ridge = ridge
        self._cache: dict = {}

    def _get(self, key, compute):
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def restricted_kernel(self, c: int) -> torch.Tensor:
        def compute():
            A = self.X[c] @ _row_basis(self.F[c])
            return A @ A.T
        return self._get(("K", c), compute)

    def train_spectrum(self, c: int) -> torch.Tensor:
        """Eigenvalues of K_c = Φ_cΦ_cᵀ, descending, clamped at 0."""
        return self._get(("lam", c), lambda: torch.linalg.eigvalsh(self.F[c] @ self.F[c].T).flip(0).clamp_min(0))

    def test_spectrum(self, c: int) -> torch.Tensor:
        """Singular values of X_c P_Φ (descending): the spectrum of the restricted test kernel's square root."""
        return self._get(("sig", c), lambda: torch.linalg.svdvals(self.X[c] @ _row_basis(self.F[c])))

    def variance(self, c: int) -> torch.Tensor:
        return self._get(("var", c), lambda: posterior_variance(self.F[c], self.X[c], self.ridge))

    def right_vectors(self, c: int) -> torch.Tensor:
        return self._get(("V", c), lambda: torch.linalg.svd(self.F[c], full_matrices=False)[2])

    def predictions(self, y_train: torch.Tensor) -> torch.Tensor:
        from ..store import digest

        return self._get(("pred", digest(y_train)), lambda: PerClassKRR(ridge=self.ridge, normalize=None)
                         .fit(self.F, y_train.double()).predict(self.X))


def _reference(F_train, F_test, ridge, reference):
    return reference if reference is not None else AllM(F_train, F_test, ridge)


def nystrom_kernel_error(F_train, synthetic, F_test, *, reference: AllM | None = None) -> float:
    """Mean over classes of ‖X P_S Xᵀ − X P_Φ Xᵀ‖_F / ‖X P_Φ Xᵀ‖_F. F_train [C, m, k]; synthetic: a
    DistilledGradients (or C tensors [s_c, k]); F_test [C, n, k]; ``reference``: an :class:`AllM` of the
    same features to reuse."""
    F, S, X = _classes(F_train, synthetic, F_test)
    ref = _reference(F, X, 0.0, reference)
    errs = []
    for c in range(F.shape[0]):
        As = X[c] @ _row_basis(S[c])
        Km, Ks = ref.restricted_kernel(c), As @ As.T
        errs.append(float((Ks - Km).norm() / Km.norm()))
    return sum(errs) / len(errs)


def _tail(values: torch.Tensor, s: int) -> float:
    """sqrt(Σ_{i>s} v_i²) / sqrt(Σ v_i²) of non-negative values sorted descending."""
    total = float((values ** 2).sum())
    return (float((values[s:] ** 2).sum()) / total) ** 0.5 if total > 0 else 0.0


def optimum_lines(F_train, synthetic, F_test, *, reference: AllM | None = None) -> dict:
    """Each method beside the best any s synthetic gradients can do, per class at that class's s (the rank
    of its synthetic set), averaged over classes:

    - ``train_kernel_error``: ‖Φ P_S Φᵀ − ΦΦᵀ‖_F / ‖ΦΦᵀ‖_F on the training points, and ``eckart_young``:
      its minimum over all rank-s sets, sqrt(Σ_{i>s} λ_i²)/‖K‖_F (reached by ``eigen``);
    - ``nystrom_oracle``: the minimum of :func:`nystrom_kernel_error` over s-dimensional subspaces of
      span(Φ), sqrt(Σ_{i>s} σ_i⁴ / Σ σ_i⁴) with σ the singular values of X P_Φ — an oracle that sees the
      test gradients — and ``nystrom_fraction``: (1 − error) / (1 − oracle error) of this set."""
    F, S, X = _classes(F_train, synthetic, F_test)
    ref = _reference(F, X, 0.0, reference)
    train, ey, oracle, frac = [], [], [], []
    for c in range(F.shape[0]):
        Q = _row_basis(S[c])
        s_c = Q.shape[1]
        A = F[c] @ Q
        K = F[c] @ F[c].T
        train.append(float((A @ A.T - K).norm() / K.norm()))
        ey.append(_tail(ref.train_spectrum(c), s_c))
        sig = ref.test_spectrum(c)
        o = _tail(sig ** 2, s_c)
        As = X[c] @ Q
        Km = ref.restricted_kernel(c)
        e = float((As @ As.T - Km).norm() / Km.norm())
        oracle.append(o)
        frac.append((1 - e) / (1 - o) if o < 1 else float("nan"))
    mean = (lambda v: sum(v) / len(v))
    return {"train_kernel_error": mean(train), "eckart_young": mean(ey), "nystrom_oracle": mean(oracle),
            "nystrom_fraction": mean(frac)}


def posterior_variance(F_train: torch.Tensor, F_test: torch.Tensor, ridge: float) -> torch.Tensor:
    """σ²(x) = φᵀφ − φᵀΦᵀ(ΦΦᵀ + λI)⁻¹Φφ for one class: F_train [m, k], F_test [n, k] → [n]."""
    Phi = V.tensor(F_train, "F_train", ndim=2, where="posterior_variance").double()
    X = V.tensor(F_test, "F_test", ndim=2, where="posterior_variance").double()
    ridge = V.nonnegative(ridge, "ridge", "pass the absolute ridge λ ≥ 0", where="posterior_variance")
    if Phi.shape[1] != X.shape[1]:
        raise DNTKError(f"posterior_variance: F_train has k={Phi.shape[1]} features but F_test k={X.shape[1]}")
    m = Phi.shape[0]
    kx = X @ Phi.T                                                            # [n, m]
    sol = torch.linalg.solve(Phi @ Phi.T + ridge * torch.eye(m, dtype=Phi.dtype), kx.T)   # [m, n]
    return (X * X).sum(1) - (kx * sol.T).sum(1)


def posterior_variance_error(F_train, synthetic, F_test, *, ridge: float, reference: AllM | None = None) -> float:
    """Mean over classes and held-out points of |σ̂²(x) − σ²(x)| / σ²(x)."""
    F, S, X = _classes(F_train, synthetic, F_test)
    ref = _reference(F, X, ridge, reference)
    errs = []
    for c in range(F.shape[0]):
        full, comp = ref.variance(c), posterior_variance(S[c], X[c], ridge)
        errs.append(float(((comp - full).abs() / full.clamp_min(1e-300)).mean()))
    return sum(errs) / len(errs)


def principal_angles(F_train, synthetic, r: int = 10, *, reference: AllM | None = None) -> dict:
    """Angles between the top-r right singular subspaces of Φ_c and S_c (r capped at each class's s):
    {"r", "mean_cos2", "max_angle_deg"} averaged over classes."""
    r = V.count(r, "r", "pass the number of leading singular directions to compare (≥ 1)", where="principal_angles")
    F, S, _ = _classes(F_train, synthetic, F_train)
    ref = _reference(F, F, 0.0, reference)
    cos2, worst, used = [], [], []
    for c in range(F.shape[0]):
        rc = min(r, S[c].shape[0], F[c].shape[0])
        if rc == 0:
            continue
        Vr = ref.right_vectors(c)[:rc].T
        W = torch.linalg.svd(S[c], full_matrices=False)[2][:rc].T
        cos = torch.linalg.svdvals(Vr.T @ W).clamp(0, 1)
        cos2.append(float((cos ** 2).mean()))
        worst.append(float(torch.rad2deg(torch.arccos(cos.min()))))
        used.append(rc)
    if not used:
        raise DNTKError("principal_angles: the synthetic set holds no gradient in any class (s = 0), so it spans no "
                        "subspace; distill with a budget ≥ 1")
    return {"r": min(used), "mean_cos2": sum(cos2) / len(cos2), "max_angle_deg": max(worst)}


def gp_prior_targets(F_train, F_test, *, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A random function from each class kernel's GP prior: f_c(x) = φ_c(x)ᵀ g_c with g_c ~ N(0, I_k)
    (so Cov f_c = K_c), seeded. Returns its values on the training points [m, C] and on the test points
    [n, C]."""
    F = V.tensor(F_train.features if hasattr(F_train, "features") else F_train, "F_train", ndim=3,
                 where="gp_prior_targets").double()
    X = V.tensor(F_test.features if hasattr(F_test, "features") else F_test, "F_test", ndim=3,
                 where="gp_prior_targets").double()
    gen = torch.Generator().manual_seed(V.seed(seed, where="gp_prior_targets"))
    g = torch.randn(F.shape[0], F.shape[2], generator=gen, dtype=torch.float64)
    return torch.einsum("cmk,ck->mc", F, g), torch.einsum("cnk,ck->nc", X, g)


def heldout_target_metrics(synthetic, F_train, F_test, y_train: torch.Tensor, y_test: torch.Tensor, *,
                           ridge: float, labels_test: torch.Tensor | None = None,
                           reference: AllM | None = None) -> dict:
    """The synthetic set's coefficients U refitted on targets y_train [m, C] it was not built for
    (ŷ' = Uᵀy'), against the all-m model on the same targets, on the test points whose true targets are
    y_test [n, C]. Returns {"synthetic": summary, "all_m": summary, "agreement": argmax agreement of the
    two models, "relative_mse": ‖pred_S − pred_m‖² / ‖pred_m‖²}; summaries as :func:`dntk.metrics.summarize`
    with y_test as the "logits" (fidelity = argmax agreement with y_test)."""
    F = (F_train.features if hasattr(F_train, "features") else F_train).double()
    X = F_test.features if hasattr(F_test, "features") else F_test
    U = synthetic.coefficients
    y = V.tensor(y_train, "y_train", ndim=2, where="heldout_target_metrics").double()
    y_test = V.predictions(y_test, "y_test", C=y.shape[1], finite=True, lists=False, where="heldout_target_metrics")
    if y.shape != (F.shape[1], F.shape[0]):
        raise DNTKError(f"heldout_target_metrics: y_train must be [m={F.shape[1]}, C={F.shape[0]}], got {tuple(y.shape)}")
    feats = [U[c].T @ F[c] for c in range(F.shape[0])]
    targs = [U[c].T @ y[:, c] for c in range(F.shape[0])]
    pred_s = PerClassKRR(ridge=ridge, normalize=None).fit(feats, targs).predict(X)
    pred_m = _reference(F, X, ridge, reference).predictions(y)
    return {"synthetic": metrics.summarize(pred_s, y_test, labels_test),
            "all_m": metrics.summarize(pred_m, y_test, labels_test),
            "agreement": metrics.fidelity(pred_s, pred_m),
            "relative_mse": float(((pred_s - pred_m) ** 2).sum() / (pred_m ** 2).sum().clamp_min(1e-300))}
