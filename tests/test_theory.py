"""Proposition 3.6's energy-gap decomposition against dense closed forms."""

import pytest
import torch

from dntk import DNTKError
from dntk.spectral import energy_gap, second_moment_spectrum, top_pca_directions


def _dense(G, V):
    """tr((I − P)Σ) with the projector P = Vᵀ(VVᵀ)⁺V built densely, Σ = GᵀG/n, and the eigen-tail."""
    S = G.T @ G / G.shape[0]
    P = V.T @ torch.linalg.pinv(V @ V.T) @ V
    d = int(torch.linalg.matrix_rank(V))
    lam = torch.linalg.eigvalsh(S).flip(0)
    total = float(torch.trace(S))
    return float(torch.trace((torch.eye(S.shape[0], dtype=S.dtype) - P) @ S)) / total, float(lam[d:].sum()) / total, d


@pytest.mark.parametrize("n,k,s", [(40, 12, 3), (8, 20, 5), (30, 10, 10)])
def test_decomposition_matches_dense_projectors(n, k, s):
    g = torch.Generator().manual_seed(n + k)
    G = torch.randn(n, k, generator=g, dtype=torch.float64) * torch.linspace(3, 0.2, k, dtype=torch.float64)
    V = torch.randn(s, k, generator=g, dtype=torch.float64)
    out = energy_gap(G, V)
    residual, tail, d = _dense(G, V)
    assert out["dim"] == d
    assert out["residual"] == pytest.approx(residual, abs=1e-10)
    assert out["pca_tail"] == pytest.approx(tail, abs=1e-10)
    assert out["gap"] >= -1e-12
    assert torch.allclose(second_moment_spectrum(G)[:min(n, k)],
                          torch.linalg.eigvalsh(G.T @ G / n).flip(0)[:min(n, k)].clamp_min(0), atol=1e-10)


def test_gap_vanishes_exactly_on_the_pca_subspace_and_not_elsewhere():
    g = torch.Generator().manual_seed(0)
    G = torch.randn(50, 15, generator=g, dtype=torch.float64) * torch.linspace(4, 0.1, 15, dtype=torch.float64)
    top = energy_gap(G, top_pca_directions(G, 4))
    assert top["dim"] == 4 and abs(top["gap"]) < 1e-10
    wide = G[:10].T.contiguous()[:, :10]                    # n < k: the SVD path
    assert abs(energy_gap(wide, top_pca_directions(wide, 3))["gap"]) < 1e-10
    rand = energy_gap(G, torch.randn(4, 15, generator=g, dtype=torch.float64))
    assert rand["gap"] > 0.05 and rand["pca_tail"] == pytest.approx(top["pca_tail"])
    # rank-deficient V: d counts the span, not the rows
    assert energy_gap(G, torch.cat([G[:2], G[:2] * 2]))["dim"] == 2
    with pytest.raises(DNTKError, match="other gradients"):
        energy_gap(G, G[:3], spectrum=second_moment_spectrum(G * 2))
    with pytest.raises(DNTKError, match="same k"):
        energy_gap(G, torch.randn(3, 14, dtype=torch.float64))
