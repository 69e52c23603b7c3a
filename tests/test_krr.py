"""PerClassKRR against dense numpy references; metrics on hand-made cases."""

import numpy as np
import pytest
import torch

from dntk import DNTKError, metrics
from dntk.kernels import PerClassKRR


def _data(C=3, m=20, n=7, k=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(C, m, k, generator=g, dtype=torch.float64), torch.randn(m, C, generator=g, dtype=torch.float64),
            torch.randn(C, n, k, generator=g, dtype=torch.float64))


def _numpy_reference(F, Y, Ft, ridge, normalize=True):
    preds = []
    for c in range(F.shape[0]):
        Phi, phi = F[c].numpy(), Ft[c].numpy()
        K = Phi @ Phi.T
        nu = np.mean(np.diag(K)) if normalize else 1.0
        alpha = np.linalg.solve(K / nu + ridge * np.eye(K.shape[0]), Y[:, c].numpy())
        preds.append(phi @ Phi.T / nu @ alpha)
    return np.stack(preds, 1)


@pytest.mark.parametrize("normalize", ["trace", None])
@pytest.mark.parametrize("k", [8, 40])  # k < m: primal by default; k > m: dual
def test_matches_dense_numpy(normalize, k):
    F, Y, Ft = _data(k=k)
    ridge = 1e-2 if normalize else 0.5
    pred = PerClassKRR(ridge=ridge, normalize=normalize).fit(F, Y).predict(Ft)
    ref = _numpy_reference(F, Y, Ft, ridge, normalize == "trace")
    assert pred.shape == (7, 3)
    np.testing.assert_allclose(pred.numpy(), ref, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("k", [8, 40])
def test_dual_and_primal_agree(k):
    F, Y, Ft = _data(k=k)
    a = PerClassKRR(ridge=1e-3, form="dual").fit(F, Y).predict(Ft)
    b = PerClassKRR(ridge=1e-3, form="primal").fit(F, Y).predict(Ft)
    assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)


def test_full_rank_truncation_equals_full_solve():
    F, Y, Ft = _data(k=40)
    full = PerClassKRR(ridge=1e-3).fit(F, Y).predict(Ft)
    r_eq_m = PerClassKRR(ridge=1e-3, rank=20, form="dual").fit(F, Y).predict(Ft)
    assert torch.allclose(full, r_eq_m, rtol=1e-8, atol=1e-10)


def test_rank_r_is_the_truncated_woodbury_predictor():
    F, Y, Ft = _data(k=40)
    r, ridge = 5, 1e-2
    pred = PerClassKRR(ridge=ridge, rank=r, form="dual").fit(F, Y).predict(Ft)
    for c in range(3):
        Phi = F[c]
        nu = float((Phi * Phi).sum(1).mean())
        U, S, Vh = torch.linalg.svd(Phi / nu ** 0.5, full_matrices=False)
        # φ(x)ᵀ V_r Σ_r (Σ_r² + λ)⁻¹ U_rᵀ y with features scaled by 1/√ν
        ref = (Ft[c] / nu ** 0.5) @ Vh[:r].T @ torch.diag(S[:r] / (S[:r] ** 2 + ridge)) @ U[:, :r].T @ Y[:, c]
        assert torch.allclose(pred[:, c], ref, rtol=1e-8, atol=1e-10)
    primal = PerClassKRR(ridge=ridge, rank=r, form="primal").fit(F, Y).predict(Ft)
    assert torch.allclose(pred, primal, rtol=1e-7, atol=1e-9)


def test_sweep_reuses_eigendecomposition_and_matches_refits():
    F, Y, Ft = _data(k=40)
    model = PerClassKRR(ridge=1e-3).fit(F, Y)
    grid = model.sweep(Ft, ridges=(1e-3, 1e-1), ranks=(3, None))
    for (lam, r), pred in grid.items():
        ref = PerClassKRR(ridge=lam, rank=r, form="dual").fit(F, Y).predict(Ft)
        assert torch.allclose(pred, ref, rtol=1e-8, atol=1e-10), (lam, r)


def test_precomputed_kernels_match_features():
    F, Y, Ft = _data(k=40)
    K = F @ F.transpose(1, 2)
    Kt = Ft @ F.transpose(1, 2)
    a = PerClassKRR(ridge=1e-3).fit(F, Y).predict(Ft)
    b = PerClassKRR(ridge=1e-3).fit_kernel(K, Y).predict_kernel(Kt)
    assert torch.allclose(a, b, rtol=1e-8, atol=1e-10)
    sw = PerClassKRR(ridge=1e-3).fit_kernel(K, Y).sweep(kernels=Kt, ridges=(1e-3,), ranks=(None,))
    assert torch.allclose(sw[(1e-3, None)], a, rtol=1e-8, atol=1e-10)


def test_per_class_lists_of_different_sizes():
    F, Y, Ft = _data(k=40)
    feats = [F[0, :5], F[1, :9], F[2]]
    targets = [Y[:5, 0], Y[:9, 1], Y[:, 2]]
    pred = PerClassKRR(ridge=1e-3).fit(feats, targets).predict(Ft)
    for c, (f, t) in enumerate(zip(feats, targets)):
        ref = PerClassKRR(ridge=1e-3).fit(f[None], t[:, None]).predict(Ft[c : c + 1])
        assert torch.allclose(pred[:, c], ref[:, 0])


def test_singular_kernel_falls_back_with_warning():
    g = torch.Generator().manual_seed(1)
    base = torch.randn(1, 2, 6, generator=g, dtype=torch.float64)
    F = base.repeat(1, 4, 1)  # 8 points, rank 2
    Y = torch.randn(8, 1, generator=g, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="Cholesky failed"):
        model = PerClassKRR(ridge=0.0, normalize=None, form="dual").fit(F, Y)
    pred = model.predict(F)
    ref = torch.linalg.pinv(F[0] @ F[0].T) @ Y[:, 0]
    assert torch.allclose(pred[:, 0], F[0] @ F[0].T @ ref, atol=1e-8)


def test_bad_input():
    F, Y, Ft = _data(k=40)
    with pytest.raises(DNTKError, match="not fitted"):
        PerClassKRR().predict(Ft)
    with pytest.raises(DNTKError, match="rank=50 exceeds"):
        PerClassKRR(rank=50, form="dual").fit(F, Y)
    bad = F.clone()
    bad[1, 2, 3] = float("nan")
    with pytest.raises(DNTKError, match="class 1 contains NaN"):
        PerClassKRR().fit(bad, Y)
    with pytest.raises(DNTKError, match="targets have 2 columns"):
        PerClassKRR().fit(F, Y[:, :2])
    with pytest.raises(DNTKError, match="zero diagonal"):
        PerClassKRR().fit(torch.zeros(1, 3, 4, dtype=torch.float64), torch.ones(3, 1))


def test_metrics_hand_made():
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [0.0, 1.0, 0.5]])
    pred = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 9.0], [0.0, 2.0, 0.0]])
    labels = torch.tensor([0, 2, 1, 1])
    assert metrics.fidelity(pred, logits) == 0.75           # argmax 0,2,2,1 vs 0,1,2,1
    assert metrics.accuracy(pred, labels) == 0.75           # 0,2,2,1 vs 0,2,1,1
    assert metrics.logit_mse(pred, logits) == pytest.approx(float(((pred - logits) ** 2).mean()))
    K = torch.diag(torch.tensor([4.0, 2.0, 1.0, 1.0]))[None].double()  # mean diag 2 → eigenvalues 2, 1, .5, .5
    cond = metrics.kernel_conditioning(K)
    assert cond["condition_number"] == pytest.approx(4.0) and cond["min_eigenvalue"] == pytest.approx(0.5)
    A = torch.eye(3, dtype=torch.float64)[None]
    assert metrics.kernel_relative_error(1.1 * A, A) == pytest.approx(0.1)
    assert metrics.kernel_alignment(3 * A, A) == pytest.approx(1.0)
    B = torch.ones(1, 3, 3, dtype=torch.float64)
    assert metrics.kernel_alignment(A, B) == pytest.approx(3 / (3 ** 0.5 * 3))


def test_summarize_mse_is_against_the_regression_targets():
    """One-hot targets: `mse` against them, `mse_vs_teacher_logits` against the logits (hand-computed)."""
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    pred = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.5, 0.0]])
    labels = torch.tensor([0, 2])
    onehot = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    s = metrics.summarize(pred, logits, labels, onehot)
    assert s["mse"] == pytest.approx((0.5 ** 2 + 1.0) / 6)                    # only (1, 1) and (1, 2) differ
    assert s["mse_vs_teacher_logits"] == pytest.approx((1 + 1 + 2.5 ** 2 + 1) / 6)
    assert s["fidelity"] == 1.0 and s["accuracy"] == 0.5
    default = metrics.summarize(pred, logits, labels)                         # targets = logits
    assert default["mse"] == default["mse_vs_teacher_logits"] == s["mse_vs_teacher_logits"]
