"""Weight-standardised weights (timm's StdConv2d, BiT/ResNetV2): the derivation is recognised by what it is
(dntk.features.capture.derivations), pulled back in closed form — dense (exact-kernel sinks) or factored
with a row-scaled Ŵ (the projectors) — and checked against brute-force autograd with the closed path
asserted taken; derivations that only look like a standardisation keep the batched vjp and stay exact."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dntk
from dntk.features.capture import derivations
from dntk.features.check import brute_force_jacobian
from dntk.projection import BlockSpec, make

from conftest import projected_reference

timm = pytest.importorskip("timm")
from timm.layers import ScaledStdConv2d, StdConv2d  # noqa: E402


class FakeStd(nn.Conv2d):
    """Looks standardised, but the mean is detached: the gradient lacks the mean term."""

    def forward(self, x):
        w = self.weight
        flat = w.reshape(w.shape[0], -1)
        mu = flat.mean(1, keepdim=True).detach()
        sd = (flat - mu).pow(2).mean(1, keepdim=True).add(1e-6).sqrt()
        return F.conv2d(x, ((flat - mu) / sd).reshape_as(w), self.bias, self.stride, self.padding)


class Net(nn.Module):
    def __init__(self, conv):
        super().__init__()
        self.c1 = conv(3, 6, 3, padding=1)
        self.c2 = conv(6, 5, 3, stride=2, padding=1)
        self.head = nn.Linear(5 * 4 * 4, 4)

    def forward(self, x):
        return self.head(torch.tanh(self.c2(torch.tanh(self.c1(x)))).flatten(1))


def _net(conv, dtype=torch.float64):
    torch.manual_seed(0)
    return Net(conv).to(dtype).eval(), torch.randn(6, 3, 8, 8, dtype=dtype)


def _kernel_from_jacobian(J):   # J [n, C, P] → K [C, n, n]
    return torch.einsum("icp,jcp->cij", J, J)


@pytest.mark.parametrize("conv,path", [(StdConv2d, "closed"), (FakeStd, "derived"), (ScaledStdConv2d, "derived")],
                         ids=["StdConv2d", "detached-mean", "ScaledStdConv2d (gain: two roots)"])
def test_exact_kernel_matches_brute_force(conv, path):
    """The exact eNTK (dense sink: the closed pull-back formed) equals brute-force autograd; a standardisation
    takes the closed form, a look-alike (detached mean) and a two-parameter derivation keep the batched vjp."""
    model, x = _net(conv)
    K = dntk.empirical_ntk(model, x, batch_size=3)
    ref = _kernel_from_jacobian(brute_force_jacobian(model, x))
    assert float((K - ref).norm() / ref.norm()) < 1e-12
    r = dntk.gradient_features(model, x, make("identity"), progress=False, batch_size=3)
    assert r.paths["c1.weight"] == path and r.paths["c2.weight"] == path


def test_float32_standardised_conv_is_exact_to_its_rounding():
    model, x = _net(StdConv2d, torch.float32)
    r = dntk.gradient_features(model, x, make("identity"), progress=False, batch_size=3)
    assert r.paths["c1.weight"] == "closed"
    ref = brute_force_jacobian(model, x).transpose(0, 1)          # [C, n, P]
    assert float((r.features - ref).norm() / ref.norm()) < 1e-5


@pytest.mark.parametrize("cache_bytes", [512 << 20, 0], ids=["M cached per batch", "M per call or block"])
def test_tensorsketch_features_equal_the_sketch_of_brute_force_gradients(monkeypatch, cache_bytes):
    """Factored pull-back + row-scaled Ŵ sketched from M: the features are the tensorsketch of the brute-force
    gradients (float32 output, so 1e-6), with project_rowscaled's M path asserted taken."""
    model, x = _net(StdConv2d)
    made = []
    real = dntk.projection.sketches.TensorSketchProjector._rowscaled_matrix
    monkeypatch.setattr(dntk.projection.sketches.TensorSketchProjector, "_rowscaled_matrix",
                        lambda self, *a: made.append(a[0]) or real(self, *a))
    proj = make("tensorsketch", k=32, seed=1)
    proj.rowscaled_cache_bytes = cache_bytes
    feats = dntk.gradient_features(model, x, proj, progress=False, batch_size=3).features
    # 2 standardised layers × 2 batches: M formed once per batch when cached, once per logit (4) when not
    assert sorted(made) == sorted(["c1.weight", "c2.weight"] * (2 if cache_bytes else 8))
    specs = dntk.features.capture.parameter_table(model).specs
    ref = projected_reference(brute_force_jacobian(model, x), specs, make("tensorsketch", k=32, seed=1).bind(specs))
    assert float((feats.double() - ref).norm() / ref.norm()) < 1e-6


@pytest.mark.parametrize("B", [1, 4, 40])
def test_project_rowscaled_is_the_projection_of_the_formed_block(B):
    """diag(d_b) Ŵ sketched from M (cached, per call) or as a formed block: the same sketch to float64 rounding,
    for every projector (the default forms the block)."""
    torch.manual_seed(2)
    rows, cols, k = 7, 5, 64
    what, d = torch.randn(rows, cols, dtype=torch.float64), torch.randn(B, rows, dtype=torch.float64)
    block = (d[:, :, None] * what[None]).reshape(B, -1)
    for name in ["tensorsketch", "sjlt", "gaussian"]:
        p = make(name, k=k, seed=4).bind([BlockSpec("w", rows * cols, (rows, cols))])
        ref = torch.zeros(B, k, dtype=torch.float64)
        p.project("w", block, ref)
        for cache in ({}, None):
            out = torch.zeros(B, k, dtype=torch.float64)
            p.project_rowscaled("w", d, what, out, cache)
            p.project_rowscaled("w", d, what, out, cache)   # again: served from the cache when there is one
            assert float((out - 2 * ref).norm() / ref.norm()) < 1e-12, (name, cache)


def test_the_check_refuses_what_is_not_a_standardisation():
    """row_standardisation answers None for a weight scaled per row without centring, and for a standardisation
    over the wrong axis (columns), though both have a derived tensor of W's shape and one root."""
    from dntk.features.capture.recorder import Source

    torch.manual_seed(0)
    W = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    flat = W - W.mean(1, keepdim=True)
    good = flat / flat.pow(2).mean(1, keepdim=True).add(1e-5).sqrt()
    scaled = W / W.pow(2).mean(1, keepdim=True).sqrt()
    cols = (W - W.mean(0, keepdim=True)) / (W - W.mean(0, keepdim=True)).pow(2).mean(0, keepdim=True).sqrt()
    std = derivations.row_standardisation(Source(None, good, ("w",), W))
    assert std is not None and torch.allclose(std.inv_sigma, 1 / flat.pow(2).mean(1).add(1e-5).sqrt())
    assert derivations.row_standardisation(Source(None, scaled, ("w",), W)) is None
    assert derivations.row_standardisation(Source(None, cols, ("w",), W)) is None


class LookAlike(nn.Conv2d):
    """Per-row (W − mean) / s with s another scale than sqrt(biased var + eps): mmcv's ConvWS (unbiased std, eps
    added outside the root) or a biased std plus eps. The values pass as a standardisation; the pull-back differs
    from the closed form only along Ŵ, by ~1/n — below a random probe's tolerance for n = 576 in float32."""

    def __init__(self, *a, scale="unbiased", **k):
        super().__init__(*a, **k)
        self.scale = scale

    def forward(self, x):
        f = self.weight.reshape(self.weight.shape[0], -1)
        c = f - f.mean(1, keepdim=True)
        s = {"unbiased": lambda: f.std(1, keepdim=True) + 1e-5,
             "eps-outside": lambda: c.pow(2).mean(1, keepdim=True).sqrt() + 1e-3,
             "true": lambda: c.pow(2).mean(1, keepdim=True).add(1e-5).sqrt()}[self.scale]()
        return F.conv2d(x, (c / s).reshape_as(self.weight), self.bias)


@pytest.mark.parametrize("scale,path", [("unbiased", "derived"), ("eps-outside", "derived"), ("true", "closed")])
def test_float32_look_alikes_keep_the_batched_vjp(scale, path):
    """Found by review: in float32 the look-alikes were taken as standardisations (1.6e-3 / 3e-4 off, rc 0) when
    the inputs line up with Ŵ's rows; the check now probes Ŵ and the ones directions row by row."""
    torch.manual_seed(0)
    model = nn.Sequential(LookAlike(9, 3, 8, scale=scale), nn.Flatten(), nn.Linear(3, 2)).float().eval()
    w = model[0].weight.detach().reshape(3, -1)
    x = (0.01 * ((w - w.mean(1, keepdim=True)) / w.std(1, keepdim=True)).sum(0)).reshape(1, 9, 8, 8).repeat(4, 1, 1, 1)
    x = x + 0.001 * torch.randn(4, 9, 8, 8)
    r = dntk.gradient_features(model, x, make("identity"), progress=False, batch_size=4)
    assert r.paths["0.weight"] == path
    ref = brute_force_jacobian(model.double(), x.double()).transpose(0, 1)
    P = model[0].weight.numel()
    assert float((r.features[:, :, :P].double() - ref[:, :, :P]).norm() / ref[:, :, :P].norm()) < 2e-6
