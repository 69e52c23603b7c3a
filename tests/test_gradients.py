"""Algorithm 1, spectral analysis and the selection baselines against closed forms."""

import pytest
import torch

from dntk import DNTKError
from dntk.gradient_distillation import local_global, ridge_leverage_scores, select, truncation_ranks
from dntk.kernels import PerClassKRR
from dntk.spectral import (alignment_matrix, containment_curves, coverage, coverage_gap, data_redundancy, eigh_desc,
                           local_global_structure, own_class_blocks, truncation_rank, variance_heatmap)


def clustered_features(C=2, groups=4, per=15, k=40, seed=0):
    """Features with cluster structure: points near `groups` random centres, plus noise."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(C, groups, k, generator=g, dtype=torch.float64) * 3
    F = centres.repeat_interleave(per, 1) + torch.randn(C, groups * per, k, generator=g, dtype=torch.float64)
    Y = torch.randn(groups * per, C, generator=g, dtype=torch.float64)
    return F, Y, torch.randn(C, 9, k, generator=g, dtype=torch.float64)


def test_one_cluster_equals_rank_r_truncated_krr():
    """paper.md §2.4: with one cluster the synthetic set is the top-r_g eigen-directions, and KRR on
    it equals rank-r_g truncated KRR on all m points (absolute ridge, no trace normalisation)."""
    F, Y, Ft = clustered_features()
    dg = local_global(F, Y, tau_v=0.9, tau_g=0.5, n_clusters=1)
    ranks = truncation_ranks(F, 0.9)
    assert dg.sizes == ranks and dg.record["per_class"][0]["n_gap"] == 0
    ridge = 0.3
    synthetic = PerClassKRR(ridge=ridge, normalize=None).fit(dg.features, dg.targets).predict(Ft)
    for c, r in enumerate(ranks):
        truncated = PerClassKRR(ridge=ridge, normalize=None, rank=r, form="dual").fit(F[c:c + 1], Y[:, c:c + 1]).predict(Ft[c:c + 1])
        rel = float((synthetic[:, c] - truncated[:, 0]).norm() / truncated.norm())
        assert rel < 1e-8


def test_synthetic_gradient_norm_is_the_eigenvalue():
    """Remark 4.2 with normalised features (K = ΦΦᵀ): ‖Φᵀu‖² = λ."""
    F, Y, _ = clustered_features()
    dg = local_global(F, Y, tau_v=0.9, tau_g=0.5, n_clusters=1)
    lam, _ = eigh_desc(F[0] @ F[0].T)
    norms = (dg.features[0] ** 2).sum(1)
    assert torch.allclose(norms, lam[: len(norms)], rtol=1e-9)
    assert torch.allclose(torch.tensor(dg.record["per_class"][0]["energies"], dtype=torch.float64), norms, rtol=1e-9)


def test_local_vectors_orthogonal_and_union_coverage_is_sum():
    F, _, _ = clustered_features(C=1)
    K = F[0] @ F[0].T
    st = local_global_structure(K, 4, 0.9, seed=0)
    padded = []
    for loc in st.local:
        for j in range(loc["rank"]):
            v = torch.zeros(K.shape[0], dtype=torch.float64)
            v[loc["indices"]] = loc["vectors"][:, j]
            padded.append(v)
    V = torch.stack(padded, 1)
    assert torch.allclose(V.T @ V, torch.eye(V.shape[1], dtype=torch.float64), atol=1e-10)
    union = coverage(st, "union")
    assert torch.allclose(union, alignment_matrix(st).sum(0))
    # ‖P_∪ u‖² computed directly from the orthonormal union basis
    U = st.global_vectors[:, : st.r_g]
    assert torch.allclose(union, ((V.T @ U) ** 2).sum(0), atol=1e-10)
    assert bool((coverage(st, "best") <= 1 + 1e-9).all())


def test_truncation_rank_hand_computed():
    lam = torch.tensor([5.0, 3.0, 1.0, 0.6, 0.4], dtype=torch.float64)  # total 10 → cumulative .5 .8 .9 .96 1.0
    assert truncation_rank(lam, 0.8) == 2
    assert truncation_rank(lam, 0.95) == 4
    assert truncation_rank(lam, 1.0) == 5
    assert truncation_rank(torch.stack([lam, lam.flip(0).sort(descending=True).values]), 0.5) == [1, 1]
    red = data_redundancy(lam, eps=0.05)
    assert red["ranks"] == [4] and red["redundancy"] == [1]
    with pytest.raises(DNTKError, match=r"tau_v=1.5 must lie in \(0, 1\]"):
        truncation_rank(lam, 1.5)


def test_property_a_and_heatmap_are_fractions():
    F, _, _ = clustered_features(C=1)
    st = local_global_structure(F[0] @ F[0].T, 4, 0.95)
    curves = containment_curves(st, r_max=F.shape[1])
    assert curves.shape[0] == st.n_clusters
    assert bool((curves[:, 1:] >= curves[:, :-1] - 1e-12).all())        # monotone in r
    assert torch.allclose(curves[:, -1], torch.ones(st.n_clusters, dtype=torch.float64), atol=1e-8)  # full span
    H = variance_heatmap(st, r=st.K.shape[0])
    assert torch.allclose(H.sum(1), torch.ones(st.n_clusters, dtype=torch.float64), atol=1e-8)  # Σ_j = tr(K_i)/tr(K_i)
    gap = coverage_gap(st, 0.9)
    assert 0 <= gap["uncovered_variance_fraction"] <= 1 and 0 <= gap["gap_variance_fraction"] <= 1


def test_own_class_blocks():
    K = torch.arange(2 * 4 * 4, dtype=torch.float64).reshape(2, 4, 4)
    labels = torch.tensor([0, 1, 0, 1])
    blocks = own_class_blocks(K, labels)
    assert torch.equal(blocks[0], K[0][[0, 2]][:, [0, 2]]) and torch.equal(blocks[1], K[1][[1, 3]][:, [1, 3]])


@pytest.mark.parametrize("mode", ["per_class", "class_average"])
def test_budget_mode_gives_exactly_s(mode):
    F, Y, _ = clustered_features()
    for s in (3, 17, 40):
        dg = local_global(F, Y, n_clusters=4, budget=s, mode=mode)
        assert dg.sizes == [s, s]
        for U in dg.coefficients:  # independent unit coefficient vectors
            assert torch.linalg.matrix_rank(U) == s
            assert torch.allclose(U.norm(dim=0), torch.ones(s, dtype=torch.float64))
    if mode == "class_average":
        assert torch.equal(dg.coefficients[0], dg.coefficients[1])


def test_gap_representatives_fill_uncovered_directions():
    F, Y, _ = clustered_features(C=1, groups=5, per=12)
    full = local_global(F, Y[:, :1], n_clusters=5, tau_v=0.95, tau_g=0.99)
    residual = local_global(F, Y[:, :1], n_clusters=5, tau_v=0.95, tau_g=0.99, gap="residual")
    rec = full.record["per_class"][0]
    assert rec["n_gap"] > 0 and "gap" in rec["kinds"]
    assert residual.sizes[0] >= 1


def test_selection_baselines_distinct_and_leverage_formula():
    F, Y, _ = clustered_features()
    for method in ("random", "fps", "kmeans", "leverage"):
        out = select(F, Y, 7, method, seed=1)
        for c, idx in enumerate(out.record["indices"]):
            assert len(set(idx)) == 7 and all(0 <= i < 60 for i in idx)
            assert torch.equal(out.features[c], F[c][idx]) and torch.equal(out.targets[c], Y[idx, c])
    K = F[0] @ F[0].T
    Kt = K / torch.diagonal(K).mean()
    dense = torch.diagonal(Kt @ torch.linalg.inv(Kt + 1e-2 * torch.eye(60, dtype=torch.float64)))
    assert torch.allclose(ridge_leverage_scores(K, 1e-2), dense, rtol=1e-8)
    fps = select(F, Y, 2, "fps", seed=3).record["indices"][0]
    d = ((F[0] - F[0][fps[0]]) ** 2).sum(1)
    assert fps[1] == int(torch.argmax(d))


def test_bad_input():
    F, Y, _ = clustered_features()
    with pytest.raises(DNTKError, match=r"tau_g=0 must lie in \(0, 1\]"):
        local_global(F, Y, tau_g=0)
    with pytest.raises(DNTKError, match="n_clusters=61 is more than the 60 points"):
        local_global(F, Y, n_clusters=61)
    with pytest.raises(DNTKError, match="budget s=61 is larger than the m=60"):
        local_global(F, Y, budget=61)
    with pytest.raises(DNTKError, match="budget s=61 is larger"):
        select(F, Y, 61)
    bad = F.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(DNTKError, match="NaN"):
        local_global(bad, Y)


def test_rank_deficient_class_kernel_is_handled():
    """A class whose gradients span 2 dimensions: its truncation rank is ≤ 2 and budget mode still
    returns exactly s independent directions (filled from the null-space eigenvectors)."""
    F, Y, _ = clustered_features(C=1)
    low = (torch.randn(60, 2, dtype=torch.float64) @ torch.randn(2, 40, dtype=torch.float64))[None]
    dg = local_global(low, Y[:, :1], n_clusters=3, tau_v=0.95)
    assert dg.record["ranks"][0] <= 2
    assert local_global(low, Y[:, :1], n_clusters=3, budget=5).sizes == [5]


def test_parameter_redundancy_distortion_shrinks_with_k():
    """Definition 3.2 measured: the inner-product distortion of a sketch falls as k grows (JL: like
    1/√k), and is zero for the exact kernel."""
    import dntk
    from dntk.spectral import check_kernel, parameter_redundancy

    from conftest import randomize_bn, small_cnn_bn

    torch.manual_seed(0)
    model = randomize_bn(small_cnn_bn(C=3)).double()
    x = torch.randn(10, 3, 8, 8, dtype=torch.float64)
    exact = dntk.empirical_ntk(model, x)
    projected = {k: dntk.gradient_features(model, x, dntk.projection.make("sjlt", k=k, seed=1), progress=False).kernel()
                 for k in (32, 512)}
    rows = parameter_redundancy(exact, {**projected, 10**9: exact})
    by_k = {r["k"]: r for r in rows}
    assert by_k[10**9]["max_distortion"] < 1e-12 and by_k[10**9]["relative_error"] < 1e-12
    assert by_k[512]["mean_distortion"] < by_k[32]["mean_distortion"]
    assert by_k[512]["relative_error"] < by_k[32]["relative_error"]
    bad = exact.clone()
    bad[0, 1, 1] = float("nan")
    with pytest.raises(DNTKError, match="NaN or inf"):
        check_kernel(bad)
