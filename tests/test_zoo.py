"""Conformance zoo: every model of tests/zoo.py and every pathological case of issue 9 gives the
exact eNTK and exact identity features (float64 brute force, ≤ 1e-6), and the sketches equal the
projector's own map applied to the brute-force gradients — with the path each parameter took
asserted, so a fast path cannot silently stop being taken."""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dntk
from dntk.projection import make

from conftest import brute_force_jacobian, projected_reference, randomize_bn, rel
from zoo import ZOO

HAS_TIMM = importlib.util.find_spec("timm") is not None


def wake(model: nn.Module, seed=0) -> nn.Module:
    """Give zero-initialised parameters (e.g. torchvision ViT's head) random values, so that every
    parameter receives gradient and a missing one shows up as an error."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def check_model(model, x, expect=None, sketches=("sjlt", "tensorsketch"), k=64, batch_size=None, J=None):
    """Exact eNTK, identity features and every sketch against brute force; returns J for reuse."""
    exact_done = J is not None
    J = brute_force_jacobian(model, x.clone()) if J is None else J  # clones: a model may modify its input
    if not exact_done:
        K = torch.einsum("icp,jcp->cij", J, J)
        Ke = dntk.empirical_ntk(model, x.clone(), batch_size=batch_size)
        assert rel(Ke, K) < 1e-6
    r = dntk.gradient_features(model, x, make("identity"), progress=False, batch_size=batch_size)
    assert rel(r.features.double(), J.transpose(0, 1)) < 1e-6
    assert all(p != "none" or (expect or {}).get(n) == "none" for n, p in r.paths.items()), r.paths
    for name, path in (expect or {}).items():
        assert r.paths[name] == path, (name, r.paths[name], path)
    factored = any("factored" in p for p in r.paths.values())
    for sk in sketches:
        variants = [{}]
        if sk == "tensorsketch":  # the FFT path forced and asserted taken, and the materialised one
            variants = [{"outer_path": "fft", "fft_max_bytes": 1 << 34}, {"outer_path": "materialise"}]
        for opts in variants:
            proj = make(sk, k=k, seed=3, **opts)
            f = dntk.gradient_features(model, x, proj, progress=False, batch_size=batch_size).features.double()
            if sk == "tensorsketch" and factored:
                taken = proj.calls["fft" if opts["outer_path"] == "fft" else "materialise"]
                assert taken > 0 and proj.calls["fft" if opts["outer_path"] != "fft" else "materialise"] == 0
            ref = projected_reference(J, dntk.features.parameter_table(model).specs, proj)
            # float32 feature storage: ~1e-7 relative; the bound leaves a factor 10
            assert rel(f, ref) < 1e-6, (sk, opts)
    return J


@pytest.mark.parametrize("name", sorted(ZOO))
def test_zoo_model_is_exact(name):
    builder, expect, needs_timm = ZOO[name]
    if needs_timm and not HAS_TIMM:
        pytest.skip("timm is not installed (pip install '.[test]')")
    torch.manual_seed(0)
    model = wake(randomize_bn(builder())).double().eval()
    n = 2 if name == "resnet18" else 3
    x = torch.randn(n, 3, 32, 32, dtype=torch.float64)
    check_model(model, x, expect)


# --- the pathological cases ----------------------------------------------------------------------
class RNNCell(nn.Module):
    """One Linear called T times per forward, zero initial state (an output without grad)."""

    def __init__(self, d=16, C=4):
        super().__init__()
        self.cell, self.head = nn.Linear(d, d), nn.Linear(d, C)

    def forward(self, x):  # x [B, T, d]
        h = torch.zeros_like(x[:, 0])
        for t in range(x.shape[1]):
            h = torch.tanh(self.cell(h) + x[:, t])
        return self.head(h)


class SharedWeight(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(8, 8), nn.Linear(8, 8), nn.Linear(8, 3)
        self.b.weight = self.a.weight

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class TwoResolutions(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, 4, 3, padding=1), nn.Linear(8, 3)

    def forward(self, x):
        return self.head(torch.cat([self.conv(x).mean((2, 3)), self.conv(F.avg_pool2d(x, 2)).amax((2, 3))], 1))


class StdConv2d(nn.Conv2d):
    """timm-style weight standardisation inside a Conv2d subclass."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.var((1, 2, 3), keepdim=True, unbiased=False) + 1e-5).sqrt()
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class StdNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = StdConv2d(3, 4, 3), nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean((2, 3)))


def normed(kind):
    lin = nn.Linear(12, 8)
    lin = {"weight_norm": lambda m: nn.utils.weight_norm(m), "spectral_norm": nn.utils.spectral_norm,
           "parametrized_weight_norm": nn.utils.parametrizations.weight_norm}[kind](lin)
    return nn.Sequential(nn.Flatten(), lin, nn.Tanh(), nn.Linear(8, 3))


class FunctionalReuse(nn.Module):
    """A module's weight also used through F.linear elsewhere."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(x)) + F.linear(x, self.fc.weight))


class InPlaceOnOutput(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.fc(x)
        h += x
        h.mul_(2.0)
        return self.head(torch.tanh(h))


class SequenceFirst(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x):  # [B, T, d] → [T, B, d]
        return self.head(torch.tanh(self.fc(x.transpose(0, 1))).mean(0))


class LinearProbe(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU())
        self.backbone.requires_grad_(False)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        return self.head(self.backbone(x))


class Tokens(nn.Module):
    """A frozen embedding on integer inputs, a trainable one, and a Linear over the tokens."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Embedding(10, 6, padding_idx=0)
        self.frozen.weight.requires_grad_(False)
        self.emb, self.fc, self.head = nn.Embedding(10, 6, padding_idx=1), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.fc(self.frozen(x)) + self.emb(x)).mean(1))


class FreeParameters(nn.Module):
    """Class token, position embedding and layer scale as bare parameters."""

    def __init__(self):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, 6))
        self.pos = nn.Parameter(torch.randn(1, 5, 6))
        self.gamma = nn.Parameter(torch.randn(6))
        self.fc, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], 1) + self.pos
        x = x + self.gamma * self.fc(x)
        return self.head(x[:, 0])


class Attention(nn.Module):
    def __init__(self, batch_first=True, need_weights=False):
        super().__init__()
        self.batch_first, self.need_weights = batch_first, need_weights
        self.attn, self.norm, self.head = nn.MultiheadAttention(8, 2, batch_first=batch_first), nn.LayerNorm(8), nn.Linear(8, 3)

    def forward(self, x):
        x = x if self.batch_first else x.transpose(0, 1)
        y = self.attn(x, x, x, need_weights=self.need_weights)[0]
        y = y if self.batch_first else y.transpose(0, 1)
        return self.head(self.norm(y).mean(1))


class ConvZoo(nn.Module):
    """Conv1d with 'same' padding, a depthwise conv with reflect padding, a grouped conv, BN, GN,
    channels-last and non-contiguous inputs."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(4, 6, 3, padding="same")
        self.dw = nn.Conv2d(4, 4, 3, groups=4, padding="same", padding_mode="reflect")
        self.g = nn.Conv2d(4, 6, 2, groups=2, padding=1)
        self.bn, self.gn, self.head = nn.BatchNorm2d(6), nn.GroupNorm(2, 6), nn.Linear(12, 3)

    def forward(self, x):
        y = self.gn(self.bn(self.g(torch.relu(self.dw(x.contiguous(memory_format=torch.channels_last))))))
        z = self.c1(x.transpose(2, 3).flatten(2))
        return self.head(torch.cat([y.mean((2, 3)), z.mean(2)], 1))


class MatmulNet(nn.Module):
    """Parameters used as the right operand of x @ W (the input side is W's rows)."""

    def __init__(self):
        super().__init__()
        self.W, self.V = nn.Parameter(torch.randn(6, 5) / 2), nn.Parameter(torch.randn(5, 3) / 2)

    def forward(self, x):  # x [B, T, 6]
        return (torch.tanh(x @ self.W).matmul(self.V)).mean(1)


class PartlyNoGrad(nn.Module):
    """A branch under the model's own no_grad and a detached weight: no gradient may flow there."""

    def __init__(self):
        super().__init__()
        self.fc, self.aux, self.head = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        with torch.no_grad():
            side = self.aux(x)
        h = torch.tanh(self.fc(x) + side + F.linear(x, self.aux.weight.detach()))
        return self.head(h)


class ScaleTwice(nn.Module):
    """The same free parameter in two successive op-vjp calls: each call counts once."""

    def __init__(self):
        super().__init__()
        self.g, self.head = nn.Parameter(torch.randn(6)), nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh((x * self.g) * self.g))


class SharedMaskedAttention(nn.Module):
    """ALBERT-style: one causal attention block applied twice (op-vjp: masks are not decomposed)."""

    def __init__(self):
        super().__init__()
        self.attn, self.head = nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 3)

    def forward(self, x):
        m = torch.triu(torch.ones(x.shape[1], x.shape[1], dtype=torch.bool), 1)
        for _ in range(2):
            x = x + self.attn(x, x, x, need_weights=False, attn_mask=m)[0]
        return self.head(x.mean(1))


class SetItem(nn.Module):
    """A mask token written with __setitem__, data written into a fresh buffer, in-place ops on a
    parameter-derived tensor and an in-place multiply by a parameter."""

    def __init__(self):
        super().__init__()
        self.mask_token, self.h0, self.gamma = nn.Parameter(torch.randn(6)), nn.Parameter(torch.randn(1, 8)), nn.Parameter(torch.randn(8))
        self.fc, self.head = nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x):  # x [B, 6]
        x = x.clone()
        x[x[:, 0] > 0] = self.mask_token
        buf = torch.zeros(x.shape[0], 8, dtype=x.dtype)
        buf[:, :6] = x
        h = self.h0.repeat(x.shape[0], 1)
        h += buf
        h = self.fc(h)
        h.mul_(self.gamma)
        return self.head(torch.tanh(h))


class Sorted(nn.Module):
    """Samples processed in a data-dependent order: no (dim, order) layout, a per-entry index map."""

    def __init__(self):
        super().__init__()
        self.fc, self.head = nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        perm = torch.argsort(x[:, 1])
        return self.head(torch.tanh(self.fc(x[perm]))[torch.argsort(perm)] * x[:, :1])


class SelfInPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        x.sub_(0.5)  # the model modifies its own input
        return self.fc(x) * self.fc.bias.type_as(x)


PATHOLOGICAL = {
    "rnn_cell_called_3x": (RNNCell, lambda: torch.randn(5, 3, 16), {"cell.weight": "factored"}),
    "shared_weight_two_modules": (SharedWeight, lambda: torch.randn(5, 8), {"a.weight": "factored"}),
    "conv_at_two_resolutions": (TwoResolutions, lambda: torch.randn(4, 3, 8, 8), {"conv.weight": "factored"}),
    "stdconv_subclass": (StdNet, lambda: torch.randn(4, 3, 6, 6), {"conv.weight": "closed", "conv.bias": "closed"}),
    "weight_norm": (lambda: normed("weight_norm"), lambda: torch.randn(4, 3, 2, 2),
                    {"1.weight_g": "derived", "1.weight_v": "derived"}),
    "spectral_norm": (lambda: normed("spectral_norm"), lambda: torch.randn(4, 3, 2, 2), {"1.weight_orig": "derived"}),
    "parametrized_weight_norm": (lambda: normed("parametrized_weight_norm"), lambda: torch.randn(4, 3, 2, 2),
                                 {"1.parametrizations.weight.original0": "derived"}),
    "weight_through_F_linear": (FunctionalReuse, lambda: torch.randn(4, 6), {"fc.weight": "factored"}),
    "inplace_on_linear_output": (InPlaceOnOutput, lambda: torch.randn(4, 6), {"fc.weight": "factored"}),
    "sequence_first_T_eq_B": (SequenceFirst, lambda: torch.randn(4, 4, 5), {"fc.weight": "factored"}),
    "sequence_first": (SequenceFirst, lambda: torch.randn(4, 7, 5), {"fc.weight": "factored"}),
    "frozen_backbone_probe": (LinearProbe, lambda: torch.randn(4, 3, 2, 2), {"head.weight": "factored"}),
    "embeddings_integer_input": (Tokens, lambda: torch.randint(0, 10, (4, 7)), {"emb.weight": "closed"}),
    "free_parameters": (FreeParameters, lambda: torch.randn(4, 4, 6),
                        {"cls": "op-vjp", "pos": "op-vjp", "gamma": "op-vjp"}),
    "multihead_attention": (Attention, lambda: torch.randn(4, 5, 8), {"attn.in_proj_weight": "factored"}),
    "multihead_attention_seq_first": (lambda: Attention(False), lambda: torch.randn(4, 5, 8),
                                      {"attn.out_proj.weight": "factored"}),
    "multihead_attention_need_weights": (lambda: Attention(True, True), lambda: torch.randn(4, 5, 8),
                                         {"attn.in_proj_weight": "op-vjp"}),
    "model_no_grad_and_detach": (PartlyNoGrad, lambda: torch.randn(4, 6), {"fc.weight": "factored", "aux.weight": "none", "aux.bias": "none"}),
    "free_parameter_used_twice": (ScaleTwice, lambda: torch.randn(4, 6), {"g": "op-vjp"}),
    "shared_masked_attention_twice": (SharedMaskedAttention, lambda: torch.randn(4, 5, 8), {"attn.in_proj_weight": "op-vjp"}),
    "setitem_and_inplace": (SetItem, lambda: torch.randn(4, 6), {"mask_token": "op-vjp", "h0": "op-vjp", "gamma": "op-vjp"}),
    "data_dependent_order": (Sorted, lambda: torch.randn(4, 6), {}),
    "input_modified_in_place_and_type_as": (SelfInPlace, lambda: torch.randn(4, 6), {"fc.weight": "factored"}),
    "matmul_with_parameter": (MatmulNet, lambda: torch.randn(4, 3, 6), {"W": "factored", "V": "factored"}),
    "transformer_encoder_layer": (lambda: nn.Sequential(nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True),
                                                        nn.Flatten(), nn.Linear(40, 3)),
                                  lambda: torch.randn(4, 5, 8), {"0.self_attn.in_proj_weight": "factored"}),
    "conv1d_grouped_depthwise_channels_last": (ConvZoo, lambda: torch.randn(4, 4, 5, 5),
                                               {"c1.weight": "factored", "dw.weight": "closed", "g.weight": "closed"}),
}


@pytest.mark.parametrize("name", sorted(PATHOLOGICAL))
def test_pathological_case_is_exact(name):
    build, data, expect = PATHOLOGICAL[name]
    torch.manual_seed(0)
    model = randomize_bn(build()).double().eval()
    x = data()
    x = x.double() if x.is_floating_point() else x
    k = min(48, J_size(model) - 1)
    J = check_model(model, x, expect, sketches=("sjlt", "tensorsketch", "gaussian"), k=k)
    check_model(model, x, expect, sketches=("tensorsketch",), k=k, batch_size=3, J=J)  # uneven batches


def test_cross_sample_model_is_refused():
    class BatchMix(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            h = self.fc(x)
            return h + h.flip(0)  # sample b's logits depend on sample B-1-b

    model = BatchMix().double()
    x = torch.randn(4, 4, dtype=torch.float64)
    with pytest.raises(dntk.DNTKError, match="samples of a batch interact"):
        dntk.gradient_features(model, x, "sjlt", k=8, progress=False)
    # one sample at a time is the model's own per-input gradient
    r = dntk.gradient_features(model, x, "identity", progress=False, batch_size=1)
    J = brute_force_jacobian(model, x)
    assert rel(r.features.double(), J.transpose(0, 1)) < 1e-6


def J_size(model):
    return dntk.features.parameter_table(model).num_params


def test_float32_index_map_keeps_small_gradients_with_their_sample():
    """float32, samples in data-dependent order, one sample's gradients 1e-5 of the others'."""
    torch.manual_seed(0)
    m = Sorted()
    x = torch.randn(3, 6)
    x[:, 1] = torch.tensor([0.5, -1.0, 2.0])
    x[1, 0] = 1e-5
    J = brute_force_jacobian(m.double(), x.double())
    f = dntk.gradient_features(m.float(), x, "identity", progress=False).features.double()
    for b in range(3):
        assert rel(f[:, b], J[b]) < 1e-5, b


class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w):
        return torch.round(w * 4) / 4

    @staticmethod
    def backward(ctx, g):
        return g


class Opaque(nn.Module):
    def __init__(self, how):
        super().__init__()
        self.how, self.fc, self.head, self._w = how, nn.Linear(6, 6), nn.Linear(6, 3), None

    def forward(self, x):
        if self.how == "function":
            w = _STE.apply(self.fc.weight)
        else:  # a derived weight cached on the first call
            if self._w is None:
                self._w = self.fc.weight * 2
            w = self._w
        return self.head(torch.tanh(F.linear(x, w)))


@pytest.mark.parametrize("how", ["function", "cache"])
def test_uses_the_recorder_cannot_see_are_refused(how):
    x = torch.randn(4, 6, dtype=torch.float64)
    model = Opaque(how).double()
    if how == "cache":
        model(x)  # a user's warm-up forward fills the cache
    with pytest.raises(dntk.DNTKError, match="cannot see"):
        dntk.gradient_features(model, x, "sjlt", k=8, progress=False)
    with pytest.raises(dntk.DNTKError):  # a cache filled under the recorder is refused on the next pass
        dntk.empirical_ntk(Opaque(how).double(), x)


class Mixer(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.kind, self.fc = kind, nn.Linear(6, 3)

    def forward(self, x):
        if self.kind == "center":
            x = x - x.mean(0)
        elif self.kind == "detached_max":
            x = x / x.detach().abs().max()
        elif self.kind == "python_index":
            table = self.fc.weight
            return torch.stack([table[int(i) % 3] for i in x[:, 0] * 3])
        return self.fc(x)


@pytest.mark.parametrize("kind", ["center", "detached_max", "python_index"])
def test_value_mixing_and_data_leaving_torch_are_refused(kind):
    x = torch.randn(4, 6, dtype=torch.float64)
    with pytest.raises(dntk.DNTKError):
        dntk.gradient_features(Mixer(kind).double(), x, "sjlt", k=8, progress=False)


def test_no_gradient_reaching_the_logits_gives_a_zero_kernel():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.unused = nn.Linear(6, 3), nn.Linear(2, 2)
            self.fc.requires_grad_(False)

        def forward(self, x):
            return self.fc(x)

    model = Unused().double()
    x = torch.randn(4, 6, dtype=torch.float64)
    K = dntk.empirical_ntk(model, x)
    assert K.shape == (3, 4, 4) and float(K.abs().max()) == 0.0
    f = dntk.gradient_features(model, x, "sjlt", k=4, progress=False).features
    assert f.shape == (3, 4, 4) and float(f.abs().max()) == 0.0
