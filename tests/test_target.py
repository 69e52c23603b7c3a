"""Target-aware gradient distillation and the kernel-level measures, against closed forms and dense
solves."""

import numpy as np
import pytest
import torch

from dntk.gradient_distillation import (DistilledGradients, distill_gradients, gp_prior_targets, heldout_target_metrics, hybrid,
                            nystrom_kernel_error, posterior_variance, posterior_variance_error, principal_angles,
                            target_direction)
from dntk.kernels import PerClassKRR


def _data(C=3, m=40, n=25, k=30, seed=0):
    g = torch.Generator().manual_seed(seed)
    # correlated features with a decaying spectrum, like real tangent features
    scales = torch.logspace(0, -2, k, dtype=torch.float64)
    F = torch.randn(C, m + n, k, generator=g, dtype=torch.float64) * scales
    Y = torch.randn(m, C, generator=g, dtype=torch.float64)
    return F[:, :m], Y, F[:, m:]


@pytest.mark.parametrize("ridge", [1e-4, 1e-1])
def test_one_target_direction_reproduces_the_all_m_model(ridge):
    """u = α/‖α‖: the one-point KRR with the same ridge equals the all-m KRR (closed form, any ridge)."""
    F, Y, Ft = _data()
    full = PerClassKRR(ridge=ridge, normalize=None).fit(F, Y).predict(Ft)
    dg = target_direction(F, Y, 1, ridge=ridge)
    assert dg.sizes == [1, 1, 1]
    syn = PerClassKRR(ridge=ridge, normalize=None).fit(dg.features, dg.targets).predict(Ft)
    assert torch.allclose(syn, full, rtol=1e-6, atol=1e-9 * float(full.abs().max()))
    # the same through the dispatcher, and the convention φ̂ = Φᵀu, ŷ = uᵀy with a unit u
    dg2 = distill_gradients("target-direction", F, Y, ridge=ridge)
    for c in range(3):
        u = dg2.coefficients[c][:, 0]
        assert abs(float(u.norm()) - 1) < 1e-12
        assert torch.allclose(dg2.features[c][0], u @ F[c]) and torch.allclose(dg2.targets[c][0], u @ Y[:, c])


def test_more_target_directions_are_orthonormal_and_hybrid_spans_algorithm_1():
    F, Y, _ = _data()
    dg = target_direction(F, Y, 5, ridge=1e-3)
    for U in dg.coefficients:
        assert torch.allclose(U.T @ U, torch.eye(5, dtype=torch.float64), atol=1e-10)
    h = hybrid(F, Y, 4, ridge=1e-3, n_clusters=3)
    lg = distill_gradients("local-global", F, Y, budget=3, n_clusters=3)
    for c in range(3):
        H = h.coefficients[c]
        assert H.shape == (40, 4)
        assert torch.allclose(H[:, 0], target_direction(F, Y, 1, ridge=1e-3).coefficients[c][:, 0])
        # Algorithm 1's directions orthonormalised against the target direction: the same span
        both = torch.cat([H[:, :1], lg.coefficients[c]], 1)
        P = H @ H.T                                   # H orthonormal: the projector onto its span
        assert torch.allclose(P @ both, both, atol=1e-10)
        assert torch.linalg.matrix_rank(both) == 4
    with pytest.raises(Exception, match="needs --budget"):
        distill_gradients("hybrid", F, Y)


def _all_points(F):
    m = F.shape[1]
    eye = torch.eye(m, dtype=torch.float64)
    return DistilledGradients([F[c] for c in range(F.shape[0])], [torch.zeros(m)] * F.shape[0], [eye] * F.shape[0])


def test_nystrom_kernel_with_all_m_is_the_restricted_kernel():
    F, _, Ft = _data(k=60)   # k > m: the span of the m gradients is a proper subspace
    assert nystrom_kernel_error(F, _all_points(F), Ft) < 1e-10
    # dense reference for the restricted kernel φ(x)ᵀ P_Φ φ(x'), P_Φ = Φᵀ(ΦΦᵀ)⁻¹Φ, against one direction
    c = 1
    Phi, X = F[c].numpy(), Ft[c].numpy()
    P = Phi.T @ np.linalg.solve(Phi @ Phi.T, Phi)
    Km = X @ P @ X.T
    s = Phi[:1]
    Ks = X @ (s.T @ s / (s @ s.T)) @ X.T
    one = DistilledGradients([F[i][:1] for i in range(3)], [torch.zeros(1)] * 3, [torch.eye(40)[:, :1]] * 3)
    per_class = []
    for i in range(3):
        Ph, Xi = F[i].numpy(), Ft[i].numpy()
        Pi = Ph.T @ np.linalg.solve(Ph @ Ph.T, Ph)
        Km_i = Xi @ Pi @ Xi.T
        si = Ph[:1]
        Ks_i = Xi @ (si.T @ si / (si @ si.T)) @ Xi.T
        per_class.append(np.linalg.norm(Ks_i - Km_i) / np.linalg.norm(Km_i))
    assert nystrom_kernel_error(F, one, Ft) == pytest.approx(np.mean(per_class), rel=1e-8)
    assert np.linalg.norm(Ks - Km) > 0.1 * np.linalg.norm(Km)  # one direction is far from the kernel


def test_posterior_variance_matches_the_dense_formula():
    F, _, Ft = _data()
    ridge = 1e-2
    Phi, X = F[0].numpy(), Ft[0].numpy()
    K = Phi @ Phi.T
    kx = X @ Phi.T
    dense = np.diag(X @ X.T) - np.einsum("nm,nm->n", kx, np.linalg.solve(K + ridge * np.eye(40), kx.T).T)
    assert np.allclose(posterior_variance(F[0], Ft[0], ridge).numpy(), dense, rtol=1e-9)
    assert posterior_variance_error(F, _all_points(F), Ft, ridge=ridge) < 1e-10
    td = target_direction(F, torch.randn(40, 3, dtype=torch.float64), 1, ridge=ridge)
    assert posterior_variance_error(F, td, Ft, ridge=ridge) > 0.1  # one direction loses the uncertainty


def test_principal_angles_and_heldout_targets():
    F, Y, Ft = _data()
    same = principal_angles(F, _all_points(F), r=5)
    assert same["mean_cos2"] == pytest.approx(1.0, abs=1e-10) and same["max_angle_deg"] < 1e-3
    td = target_direction(F, Y, 1, ridge=1e-4)
    assert principal_angles(F, td, r=5)["r"] == 1
    # the target direction is exact on its own targets and not on targets it never saw
    y_tr, y_te = gp_prior_targets(F, Ft, seed=1)
    own = heldout_target_metrics(td, F, Ft, Y, Ft.new_zeros(25, 3), ridge=1e-4)
    assert own["relative_mse"] < 1e-10 and own["agreement"] == 1.0
    other = heldout_target_metrics(td, F, Ft, y_tr, y_te, ridge=1e-4)
    assert other["relative_mse"] > 0.05
    allm = heldout_target_metrics(_all_points(F), F, Ft, y_tr, y_te, ridge=1e-4)
    assert allm["relative_mse"] < 1e-16 and allm["agreement"] == 1.0


def test_budget_curves_carry_the_unseen_measures_and_figure3_draws_them(tmp_path):
    from dntk.gradient_distillation import GRADIENT_METHODS, budget_curves
    from dntk.report import figure3

    F, Y, Ft = _data()
    labels_tr, labels_te = torch.arange(40) % 3, torch.arange(25) % 3
    rows = budget_curves(F, Y, Ft, Y.new_zeros(25, 3) + torch.randn(25, 3, dtype=torch.float64), labels_te,
                         ridge=1e-3, budgets=[1, 4], methods=GRADIENT_METHODS, seeds=(0, 1), n_clusters=3,
                         unseen_labels=(labels_tr, labels_te))
    assert {r["method"] for r in rows} == set(GRADIENT_METHODS) and all(r["jacobians"] == 40 * 3 for r in rows)
    td = next(r for r in rows if r["method"] == "target-direction" and r["s"] == 1)
    assert 0 <= td["gp_agreement"] <= 1 and td["nystrom_error"] > 0.5 and td["principal_r"] == 1
    path = figure3(rows, 40, tmp_path / "f3.png")
    assert path.stat().st_size > 20_000


def test_the_shared_all_m_reference_changes_no_number_and_is_reused():
    """unseen_measures with one AllM reused across sets equals fresh computations per set, and the
    reference really computes the all-m side once (its cache holds one entry per class and target)."""
    from dntk.gradient_distillation import distill_gradients, unseen_measures
    from dntk.gradient_distillation.kernel_metrics import AllM

    F, Y, Ft = _data()
    labels_tr, labels_te = torch.arange(40) % 3, torch.arange(25) % 3
    ref = AllM(F, Ft, 1e-3)
    for method, s in (("local-global", 4), ("fps", 3), ("target-direction", 1)):
        dg = distill_gradients(method, F, Y, budget=s, n_clusters=3, ridge=1e-3)
        shared = unseen_measures(dg, F, Ft, labels_tr, labels_te, ridge=1e-3, reference=ref)
        fresh = unseen_measures(dg, F, Ft, labels_tr, labels_te, ridge=1e-3)
        assert shared.keys() == fresh.keys()
        for key in fresh:
            assert shared[key] == pytest.approx(fresh[key], rel=1e-12, abs=1e-15), key
    kinds = [k[0] for k in ref._cache]
    assert kinds.count("K") == kinds.count("var") == kinds.count("V") == 3 and kinds.count("pred") == 2
