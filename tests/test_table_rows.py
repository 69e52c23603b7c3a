"""Embedding tables: the per-sample gradient goes to the sink as (row index, output-gradient row) pairs, which
tensorsketch adds straight into its buckets (never forming [B, rows·cols]); sinks that need blocks form them.
Checked against brute-force autograd with the sparse path asserted taken: padding rows, tokens repeated
within a sample, a table used twice, and a derived table (formed and pulled back)."""

import pytest
import torch
import torch.nn as nn

import dntk
from dntk.features.check import brute_force_jacobian
from dntk.projection import BlockSpec, make

from conftest import projected_reference


class TokenNet(nn.Module):
    def __init__(self, tied=False, derived=False):
        super().__init__()
        self.emb = nn.Embedding(13, 4, padding_idx=0)
        self.pos = nn.Embedding(6, 4)
        self.tied, self.derived = tied, derived
        self.head = nn.Linear(4, 3)

    def forward(self, ids):
        table = self.emb.weight * 2.0 if self.derived else self.emb.weight
        h = nn.functional.embedding(ids, table, padding_idx=0) + self.pos(torch.arange(ids.shape[1]))
        if self.tied:
            h = h + nn.functional.embedding(ids.flip(1), table, padding_idx=0)
        return self.head(torch.tanh(h).mean(1))


def _ids():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 13, (6, 6), generator=g)
    ids[:, 4:] = 0                  # padding
    ids[1, :3] = 5                  # a token repeated within a sample
    return ids


@pytest.mark.parametrize("tied,derived", [(False, False), (True, False), (False, True)],
                         ids=["table", "table used twice", "derived table"])
def test_tensorsketch_features_equal_the_sketch_of_brute_force_gradients(monkeypatch, tied, derived):
    torch.manual_seed(0)
    model = TokenNet(tied, derived).double().eval()
    ids = _ids()
    taken = []
    real = dntk.projection.sketches.TensorSketchProjector.project_rows
    monkeypatch.setattr(dntk.projection.sketches.TensorSketchProjector, "project_rows",
                        lambda self, key, *a: taken.append(key) or real(self, key, *a))
    feats = dntk.gradient_features(model, ids, make("tensorsketch", k=16, seed=3), progress=False, batch_size=3).features
    assert ("emb.weight" in taken) == (not derived)   # the position table (constant indices) is a derivation
    J = brute_force_jacobian(model, ids)
    specs = dntk.features.capture.parameter_table(model).specs
    ref = projected_reference(J, specs, make("tensorsketch", k=16, seed=3).bind(specs))
    assert float((feats.double() - ref).norm() / ref.norm()) < 1e-6
    K = dntk.empirical_ntk(model, ids, batch_size=3)           # the dense sink forms the table gradient
    KJ = torch.einsum("icp,jcp->cij", J, J)
    assert float((K - KJ).norm() / KJ.norm()) < 1e-12


def test_project_rows_is_the_projection_of_the_formed_table_gradient():
    torch.manual_seed(1)
    rows, cols, B, T, k = 9, 5, 4, 7, 32
    idx = torch.randint(0, rows, (B, T))
    idx[0, :4] = 2
    vals = torch.randn(B, T, cols, dtype=torch.float64)
    G = torch.zeros(B, rows, cols, dtype=torch.float64).scatter_add_(1, idx[..., None].expand(-1, -1, cols), vals)
    for name in ["tensorsketch", "sjlt", "gaussian", "identity"]:
        p = make(name, k=k if name != "identity" else None, seed=2).bind([BlockSpec("w", rows * cols, (rows, cols))])
        ref = torch.zeros(B, p.dim, dtype=torch.float64)
        out = torch.zeros(B, p.dim, dtype=torch.float64)
        p.project("w", G.reshape(B, -1), ref)
        p.project_rows("w", idx, vals, out)
        assert float((out - ref).norm() / ref.norm()) < 1e-12, name
