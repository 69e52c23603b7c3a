"""The spectral stage-3 baselines (issue #24): `eigen` (top-s eigenvectors of each class kernel) and
`hybrid-eigen`, against dense numpy eigendecompositions, the Eckart–Young bound, the all-m regression,
and the optimum lines of dntk.gradient_distillation.optimum_lines."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from dntk.errors import DNTKError
from dntk.gradient_distillation import (GRADIENT_METHODS, distill_gradients, eigen, hybrid_eigen, optimum_lines)
from dntk.gradient_distillation.kernel_metrics import nystrom_kernel_error
from dntk.kernels import PerClassKRR


def problem(C=3, m=30, k=40, n=25, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a decaying spectrum, so the top eigenvectors are well separated
    scale = torch.logspace(0, -2, k, dtype=torch.float64)
    F = torch.randn(C, m, k, generator=g, dtype=torch.float64) * scale
    X = torch.randn(C, n, k, generator=g, dtype=torch.float64) * scale
    Y = torch.randn(m, C, generator=g, dtype=torch.float64)
    return F, Y, X


@pytest.mark.parametrize("s", [1, 4, 10])
def test_eigen_spans_numpys_top_eigenvectors_and_meets_eckart_young(s):
    """The coefficient columns span the top-s eigenvectors of numpy's eigh of Φ_cΦ_cᵀ (projector difference
    < 1e-10), are orthonormal with a positive largest entry, and the compressed training kernel Φ P_S Φᵀ has
    exactly the Eckart–Young error sqrt(Σ_{i>s} λ_i²) (1e-10 relative)."""
    F, Y, X = problem()
    dg = eigen(F, Y, s)
    for c in range(F.shape[0]):
        K = (F[c] @ F[c].T).numpy()
        lam, vec = np.linalg.eigh(K)
        top = vec[:, ::-1][:, :s]
        U = dg.coefficients[c].numpy()
        assert np.abs(U @ U.T - top @ top.T).max() < 1e-10
        assert np.abs(U.T @ U - np.eye(s)).max() < 1e-12
        assert (U[np.abs(U).argmax(0), np.arange(s)] > 0).all()
        # the compressed training kernel: K restricted to the synthetic span
        S = dg.features[c].numpy()
        Q, _ = np.linalg.qr(S.T)
        A = F[c].numpy() @ Q
        err = np.linalg.norm(A @ A.T - K)
        bound = np.sqrt((lam[::-1][s:] ** 2).sum())
        assert abs(err - bound) <= 1e-10 * np.linalg.norm(K)
        assert torch.allclose(dg.targets[c], dg.coefficients[c].T @ Y[:, c])
    lines = optimum_lines(F, dg, X)
    assert lines["train_kernel_error"] == pytest.approx(lines["eckart_young"], rel=1e-9, abs=1e-12)


def test_no_method_beats_eckart_young_on_the_training_points():
    """Every other method's training-kernel error at the same s is ≥ the Eckart–Young bound (what makes it
    a bound), and on the test points every set's Nyström error is ≥ the oracle's, fraction ≤ 1."""
    F, Y, X = problem(seed=1)
    for method in GRADIENT_METHODS:
        dg = distill_gradients(method, F, Y, budget=5, ridge=1e-3)
        lines = optimum_lines(F, dg, X)
        assert lines["train_kernel_error"] >= lines["eckart_young"] - 1e-10, method
        assert nystrom_kernel_error(F, dg, X) >= lines["nystrom_oracle"] - 1e-10, method
        assert lines["nystrom_fraction"] <= 1 + 1e-9, method


def test_the_nystrom_oracle_is_reached_by_the_test_optimal_subspace():
    """The oracle's closed form sqrt(Σ_{i>s} σ_i⁴/Σ σ_i⁴) equals the Nyström error of the subspace it names
    (the top-s right singular vectors of X P_Φ, written as combinations of the m training gradients)."""
    from dntk.gradient_distillation import DistilledGradients

    F, Y, X = problem(seed=2)
    s = 3
    sets = []
    for c in range(F.shape[0]):
        Q, _ = torch.linalg.qr(F[c].T)                       # basis of span(Φ_c) [k, m]
        _, _, Vh = torch.linalg.svd(X[c] @ Q, full_matrices=False)
        directions = (Q @ Vh[:s].T).T                        # [s, k], inside span(Φ_c)
        sets.append(directions)
    dg = DistilledGradients(sets, [torch.zeros(s) for _ in sets], [None] * len(sets))
    lines = optimum_lines(F, dg, X)
    assert nystrom_kernel_error(F, dg, X) == pytest.approx(lines["nystrom_oracle"], rel=1e-9)
    assert lines["nystrom_fraction"] == pytest.approx(1.0, rel=1e-9)


@pytest.mark.parametrize("s", [1, 2, 6])
@pytest.mark.parametrize("ridge", [1e-3, 0.1])
def test_hybrid_eigen_reproduces_the_all_m_regression_at_every_s(s, ridge):
    """The synthetic kernel model's test predictions equal the all-m model's (1e-9), its first direction
    is α/‖α‖ and the other directions are orthogonal to it and span the top s − 1 eigenvectors of the
    kernel on its complement."""
    F, Y, X = problem(seed=3)
    dg = hybrid_eigen(F, Y, s, ridge=ridge)
    full = PerClassKRR(ridge=ridge, normalize=None).fit(F, Y).predict(X)
    syn = _predict(dg, X, ridge)
    assert torch.allclose(syn, full, rtol=1e-9, atol=1e-9 * float(full.abs().max()))
    for c in range(F.shape[0]):
        U = dg.coefficients[c]
        alpha = torch.linalg.solve(F[c] @ F[c].T + ridge * torch.eye(F.shape[1], dtype=torch.float64), Y[:, c])
        assert torch.allclose(U[:, 0], alpha / alpha.norm(), atol=1e-12)
        if s > 1:
            assert float((U[:, 1:].T @ U[:, 0]).abs().max()) < 1e-12
        if s > 1:
            u = U[:, 0]
            P = torch.eye(F.shape[1], dtype=torch.float64) - torch.outer(u, u)
            lam, vec = np.linalg.eigh((P @ F[c] @ F[c].T @ P).numpy())
            top = vec[:, ::-1][:, :s - 1]
            R = U[:, 1:].numpy()
            assert np.abs(R @ R.T - top @ top.T).max() < 1e-9


def _predict(dg, X, ridge):
    """The per-class synthetic KRR's predictions on X [C, n, k] → [n, C] (one class at a time)."""
    cols = []
    for c, (S, t) in enumerate(zip(dg.features, dg.targets)):
        a = torch.linalg.solve(S @ S.T + ridge * torch.eye(S.shape[0], dtype=S.dtype), t)
        cols.append(X[c] @ S.T @ a)
    return torch.stack(cols, 1)


def test_s_beyond_the_rank_and_the_refusals():
    """s above the class kernel's rank keeps rank directions (recorded s); a zero class kernel, a missing
    budget and budget 0 are refused by name."""
    F, Y, _ = problem(m=12, k=5)                             # rank ≤ 5
    dg = eigen(F, Y, 9)
    assert dg.record["s"] == [5, 5, 5]
    Z = F.clone()
    Z[1] = 0
    with pytest.raises(DNTKError, match="class 1's kernel is zero"):
        eigen(Z, Y, 2)
    with pytest.raises(DNTKError, match="needs --budget"):
        distill_gradients("eigen", F, Y, budget=None)
    with pytest.raises(DNTKError, match="budget"):
        distill_gradients("hybrid-eigen", F, Y, budget=0)


def test_a_tie_at_the_boundary_is_recorded():
    """Two equal eigenvalues straddling s: the subspace is not unique — recorded as tied."""
    F = torch.zeros(1, 4, 4, dtype=torch.float64)
    F[0] = torch.diag(torch.tensor([3.0, 2.0, 2.0, 1.0], dtype=torch.float64))
    dg = eigen(F, torch.ones(4, 1, dtype=torch.float64), 2)
    assert dg.record["tied"] == [True]
    assert eigen(F, torch.ones(4, 1, dtype=torch.float64), 3).record["tied"] == [False]


def test_budget_curves_keep_every_seeds_measures_for_tests_between_methods():
    """unseen_seeds='all': each held-out and kernel measure is the mean of its per-seed values (kept as
    <key>_values, as the distillation-target metrics are), the GP-prior target the same for every seed;
    the eigen rows carry the optimum lines, with train error = Eckart–Young. A wrong mode is refused."""
    from dntk.gradient_distillation import budget_curves

    F, Y, X = problem(seed=4)
    g = torch.Generator().manual_seed(0)
    labels, labels_te = torch.randint(0, 3, (30,), generator=g), torch.randint(0, 3, (25,), generator=g)
    logits_te = torch.randn(25, 3, generator=g, dtype=torch.float64)
    rows = budget_curves(F, Y, X, logits_te, labels_te, ridge=1e-3, budgets=[3], methods=["random", "eigen"],
                         seeds=(0, 1, 2), unseen_labels=(labels, labels_te), unseen_seeds="all")
    rnd, eig = rows
    for key in ("nystrom_error", "gp_agreement", "fidelity"):
        assert len(rnd[f"{key}_values"]) == 3
        assert rnd[key] == pytest.approx(sum(rnd[f"{key}_values"]) / 3, rel=1e-12)
    assert len(set(rnd["nystrom_error_values"])) > 1                     # random subsets differ by seed
    assert eig["train_kernel_error"] == pytest.approx(eig["eckart_young"], rel=1e-9)
    assert rnd["train_kernel_error"] > eig["train_kernel_error"]
    with pytest.raises(DNTKError, match="unseen_seeds"):
        budget_curves(F, Y, X, logits_te, labels_te, ridge=1e-3, budgets=[3], methods=["eigen"],
                      unseen_labels=(labels, labels_te), unseen_seeds="every")


def _row(method, s, **values):
    return {"method": method, "s": s, **{f"{k}_values": v for k, v in values.items()}}


def test_compare_methods_is_welch_where_a_side_varies_and_exact_where_neither_does():
    """compare_methods against scipy's Welch test, each metric's direction, ties and the deterministic case."""
    from scipy.stats import ttest_ind

    from dntk.gradient_distillation import compare_methods

    rows = [_row("local-global", 5, fidelity=[0.6, 0.7, 0.8], mse=[2.0, 2.0, 2.0], nystrom_error=[0.3, 0.3, 0.3]),
            _row("eigen", 5, fidelity=[0.65, 0.65, 0.65], mse=[1.0, 1.0, 1.0], nystrom_error=[0.3, 0.3, 0.3]),
            _row("eigen", 10, fidelity=[0.9])]               # no Algorithm 1 row at s = 10: not compared
    out = {w["metric"]: w for w in compare_methods(rows, "local-global", "eigen")}
    assert set(out) == {"fidelity", "mse", "nystrom_error"} and {w["s"] for w in out.values()} == {5}
    with warnings.catch_warnings():   # scipy flags the constant side's zero variance
        warnings.simplefilter("ignore", RuntimeWarning)
        t, p = ttest_ind([0.6, 0.7, 0.8], [0.65] * 3, equal_var=False)
    assert float(t) == pytest.approx(0.05 / (0.1 / 3 ** 0.5))   # one-sample t: the constant side adds no variance
    assert out["fidelity"]["t"] == pytest.approx(float(t), rel=1e-12) and out["fidelity"]["p"] == pytest.approx(float(p))
    assert out["fidelity"]["better"] == "local-global"          # mean 0.7 > 0.65, higher is better
    assert out["mse"]["better"] == "eigen" and out["mse"]["t"] != out["mse"]["t"]    # lower is better; no spread: NaN
    assert out["nystrom_error"]["better"] == "tie"


def test_spectral_optimum_verdict_follows_the_rows():
    """The reproduce report's verdict and advice are derived from the rows, not written in: who wins where,
    and the kernel-level advice only when eigen had every kernel-level measure."""
    from dntk.report.claims import spectral_optimum

    def res(rows):
        return {"counts": {"m": 500}, "gradient_distillation": {"figure3_rows": rows}}

    eigen_wins = [_row("local-global", 5, fidelity=[0.6], nystrom_error=[0.2]),
                  _row("eigen", 5, fidelity=[0.7], nystrom_error=[0.16])]
    eigen_wins[1]["nystrom_fraction"] = 0.99
    so = spectral_optimum(res(eigen_wins))
    assert so["verdict"] == "eigen is better than Algorithm 1 on every measure at every budget"
    assert "use eigen" in so["advice"] and "99.0%" in so["advice"] and so["deterministic"]
    assert so["wins"] == {"5": {"local-global": 0, "eigen": 2, "tie": 0}}
    mixed = eigen_wins + [_row("local-global", 1, fidelity=[0.44], nystrom_error=[0.47]),
                          _row("eigen", 1, fidelity=[0.28], nystrom_error=[0.31])]
    so = spectral_optimum(res(mixed))
    assert so["verdict"] == "Algorithm 1 is better than eigen only at s = 1 (m/s = 500×) on fidelity"
    kernel_lost = [_row("local-global", 5, nystrom_error=[0.1]), _row("eigen", 5, nystrom_error=[0.2])]
    assert "neither method dominated" in spectral_optimum(res(kernel_lost))["advice"]
    assert spectral_optimum(res([_row("eigen", 5, fidelity=[0.7])])) is None
