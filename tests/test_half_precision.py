"""Half-precision models (bfloat16, float16): the engine's per-sample layouts are measured with thresholds
that mean something in the dtype, or the batch is refused.

Before this, the support threshold 1e3·eps·max of measure_layouts exceeded the maximum in bfloat16
(eps = 2^-7), so no entry was checked, every layout "matched" and a sequence-first layer's features
were silently wrong (a [T, B, D] Linear 100% off at B = 2). The reference is per-sample autograd of
the same model in float64; a half model cannot be closer to it than its own rounding, so the bound is
a small multiple of the error of plain per-sample autograd run in the half dtype itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from dntk.errors import DNTKError
from dntk.features import gradient_features
from dntk.features.capture.layouts import Layout, measure_layouts

from conftest import brute_force_jacobian, rel

HALF = [torch.bfloat16, torch.float16]


class SeqFirstLinear(nn.Module):
    """x [B, T, D] → [T, B, D]: the Linear's output has its samples on dim 1."""

    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.lin(x.transpose(0, 1))).mean(0))


class SeqFirstEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.enc, self.head = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.enc(x.transpose(0, 1)).mean(0))


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn, self.head = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.bn(self.conv(x))).mean((2, 3)))


CASES = [(SeqFirstLinear, (6, 4, 6)), (SeqFirstEncoder, (6, 5, 8)), (ConvBN, (6, 3, 6, 6))]


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
@pytest.mark.parametrize("make,shape", CASES, ids=[c[0].__name__ for c in CASES])
def test_half_models_batched_are_as_exact_as_their_rounding(make, shape, dtype, captures):
    """Identity features of 6 samples in batches of 3 (so a later batch of the same call pattern exists):
    within 3× + 1e-3 of the error per-sample autograd in the same dtype has against float64, and every
    batch measured (the float-weight verification of cached layouts is not exact in half precision)."""
    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(*shape)
    ref = brute_force_jacobian(model.double(), x.double()).float()              # [n, C, P]
    model = model.to(dtype)
    own = rel(brute_force_jacobian(model, x.to(dtype)).float(), ref)            # the dtype's own rounding
    res = gradient_features(model, x.to(dtype), "identity", batch_size=3, progress=False)
    err = rel(res.features.permute(1, 0, 2).float(), ref)
    assert err <= 3 * own + 1e-3, (err, own)
    c = captures[-1]
    assert (c.measured, c.verified) == (2, 0)


@pytest.mark.parametrize("dtype", HALF, ids=["bf16", "fp16"])
def test_sequence_first_layout_is_measured_in_half_precision(dtype):
    """measure_layouts finds the samples of a [T, B, D] output on dim 1 in half precision (the old
    threshold left no entry to check and returned the first candidate, dim 0)."""
    torch.manual_seed(0)
    model = SeqFirstLinear().to(dtype)
    x = torch.randn(2, 4, 6).to(dtype)   # T = 4 is a multiple of B = 2: dim 0 is a candidate too
    out = []
    h = model.lin(x.transpose(0, 1))
    out.append(h)
    logits = model.head(torch.tanh(h).mean(0))
    layouts, unique, _ = measure_layouts(logits, out)
    assert layouts == [Layout(1, "major")]


def test_gradients_near_float16_subnormals_are_refused():
    """A layer whose output gradients all sit below float16's normal range cannot be split by sample
    (rounding there does not commute with the weights): refused by name, not guessed."""

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            return self.head(self.lin(x.transpose(0, 1)).mean(0)) * 1e-6 * 1e-1

    torch.manual_seed(0)
    model = Tiny().to(torch.float16)
    with pytest.raises(DNTKError, match="subnormal range of float16"):
        gradient_features(model, torch.randn(4, 5, 6).to(torch.float16), "identity", batch_size=4, progress=False)


# ---- review findings (helper review of the first version of this fix) ----------------------------------

class DetachedMix(nn.Module):
    """Couples the samples through a detached batch mean: the gradient cannot see it, only the logits can."""

    def __init__(self, a, scale=1.0):
        super().__init__()
        self.a, self.scale, self.lin, self.head = a, scale, nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.lin(x)
        return self.scale * self.head(torch.tanh(h - self.a * h.mean(0, keepdim=True).detach()))


@pytest.mark.parametrize("dtype,scale", [(torch.bfloat16, 1.0), (torch.float16, 0.1)], ids=["bf16", "fp16-small-logits"])
def test_value_only_coupling_is_refused_in_half_precision(dtype, scale):
    """A detached batch mean moving the logits by a few per cent: the alone-vs-batch logit check must see it
    in half precision too (16·eps·(max + 1) let it through, the features 16–93× the dtype's rounding off)."""
    torch.manual_seed(0)
    model, x = DetachedMix(0.1, scale).to(dtype), torch.randn(16, 6).to(dtype)
    with pytest.raises(DNTKError, match="depends on the rest of its batch"):
        gradient_features(model, x, "identity", batch_size=16, progress=False)


class SeqFirstGain(nn.Module):
    """x [B, T, 7] → [T, B, ·]; channel 0 a per-(sample, step) gain, so one entry dominates the gradient."""

    def __init__(self, k=1.0):
        super().__init__()
        self.k, self.lin, self.head = k, nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        xt = x.transpose(0, 1)
        return self.k * self.head((self.lin(xt[..., 1:]) * xt[..., :1]).mean(0))


@pytest.mark.parametrize("dtype,gain,k", [(torch.float16, 0.1, 0.01), (torch.float32, 1e-5, 1.0)], ids=["fp16", "fp32"])
def test_layouts_that_fit_only_the_checked_entries_are_not_guessed(dtype, gain, k):
    """The checked entries (one sample's, at one step) fit several layouts while the other entries carry
    gradient: each entry is classified instead of the first candidate taken (18% and 40% off before)."""
    torch.manual_seed(1)
    x = torch.randn(2, 4, 7)
    x[:, :, 0] = gain
    x[0, 0, 0] = 1.0
    x[1, :, 1:] *= 10
    model = SeqFirstGain(k).eval()
    ref = brute_force_jacobian(model.double(), x.double()).float()
    model = model.to(dtype)
    own = rel(brute_force_jacobian(model, x.to(dtype)).float(), ref)
    err = rel(gradient_features(model, x.to(dtype), "identity", batch_size=2, progress=False).features
              .permute(1, 0, 2).float(), ref)
    assert err <= 3 * own + 1e-6, (err, own)


class MeanPool(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):                          # [B, T, 6], batch first
        return self.head(torch.tanh(self.lin(x)).mean(1))


class Amp(nn.Module):
    """A gain of k² applied as two multiplies: the Linear's output gradient is ~k² (near float16's 65504)."""

    def __init__(self, k):
        super().__init__()
        self.k, self.lin, self.head = k, nn.Linear(6, 6, bias=False), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(self.lin(x) * self.k * self.k)


@pytest.mark.parametrize("make,shape,factor", [(MeanPool, (2, 2048, 6), 1.0), (lambda: Amp(300.0), (4, 6), 1e-4)],
                         ids=["tiny-gradients", "near-overflow"])
def test_float16_passes_are_rescaled_not_refused(make, shape, factor):
    """float16 gradients near the subnormal range (a mean over 2,048 steps) or near overflow (the weight-2
    pass above 65504) are measured with the cotangent scaled by a power of two, which commutes with
    rounding: exact to the dtype's rounding, where they were refused."""
    torch.manual_seed(1)
    model, x = make().eval(), torch.randn(*shape) * factor
    ref = brute_force_jacobian(model.double(), x.double()).float()
    model = model.half()
    own = rel(brute_force_jacobian(model, x.half()).float(), ref)
    err = rel(gradient_features(model, x.half(), "identity", batch_size=shape[0], progress=False).features
              .permute(1, 0, 2).float(), ref)
    assert err <= 3 * own + 1e-3, (err, own)


def test_a_bfloat16_body_with_a_float32_head_is_judged_at_bfloat16_rounding():
    """The agreement checks take the coarsest dtype of the model, not the logits' (a float32 tolerance
    refused this exact model as batch-dependent)."""

    class Bf16Body(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x):
            h = torch.tanh(self.lin(x.transpose(0, 1).to(self.lin.weight.dtype)))
            return self.head(h.to(self.head.weight.dtype).mean(0))

    torch.manual_seed(0)
    model, x = Bf16Body().eval(), torch.randn(10, 4, 6)
    ref = brute_force_jacobian(model.double(), x.double()).float()
    model.float().lin.to(torch.bfloat16)
    own = rel(brute_force_jacobian(model, x).float(), ref)
    err = rel(gradient_features(model, x, "identity", batch_size=3, progress=False).features.permute(1, 0, 2).float(), ref)
    assert err <= 3 * own + 1e-3, (err, own)
