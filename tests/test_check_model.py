"""dntk.check_model / `dntk check-model`: the engine against brute-force autograd on the user's inputs."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import dntk
from dntk.cli import main
from dntk.features import brute_force_jacobian, check_model

from conftest import brute_force_jacobian as reference_jacobian, mlp, small_cnn_bn
from test_engine_errors import TupleOut


class Attention(nn.Module):
    """Self-attention over 4 tokens, a model the conformance zoo covers only through nn.MultiheadAttention."""

    def __init__(self, C=3):
        super().__init__()
        self.qkv, self.out = nn.Linear(6, 18), nn.Linear(6, C)

    def forward(self, x):                     # x [B, 4, 6]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(1, 2) / 6 ** 0.5, dim=-1)
        return self.out((a @ v).mean(1))


class BatchCentred(nn.Module):
    """Subtracts the batch mean: one sample's logits depend on the others (no per-sample gradient)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        h = x.flatten(1)
        return self.fc(h - h.mean(0, keepdim=True))


@pytest.mark.parametrize("make,shape", [(mlp, (5, 3, 2, 2)), (small_cnn_bn, (4, 3, 8, 8)), (Attention, (5, 4, 6))],
                         ids=["mlp", "cnn-bn", "attention"])
def test_check_model_finds_the_engine_exact_and_its_reference_is_brute_force(make, shape):
    torch.manual_seed(0)
    model = make().double()
    x = torch.randn(*shape, dtype=torch.float64)
    # the library's reference equals the test suite's own (both per sample alone, per logit)
    assert torch.equal(brute_force_jacobian(model, x), reference_jacobian(model, x))
    model.train()
    res = check_model(model, x, k=32)
    assert model.training                                            # mode restored
    assert res.exact and res.refusal is None and res.n == shape[0]
    assert res.max_relative_error < 1e-6 and res.kernel_relative_error < 1e-9      # float32 features, float64 kernel
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert [r["name"] for r in res.per_parameter] == names
    assert sum(r["numel"] for r in res.per_parameter) == res.parameters == sum(p.numel() for p in model.parameters())
    assert abs(sum(res.path_shares.values()) - 1) < 1e-12 and all(r["path"] != "none" for r in res.per_parameter)
    assert res.sketch["k"] == 32 and 0 < res.sketch["kernel_relative_error"] < 1
    assert json.loads(json.dumps(res.to_dict()))["exact"] is True
    assert res.summary().startswith("EXACT:") and all(r["passed"] for r in res.per_parameter)


def test_a_wrong_parameter_block_is_caught_and_named(monkeypatch):
    """Negative control: features wrong in one parameter's block by 1e-3 (relative) fail the check, and
    that parameter is the worst one reported — the comparison can fail."""
    import dntk.features.check as check

    torch.manual_seed(1)
    model = mlp().double()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    real = check.gradient_features

    def corrupt(*args, **kwargs):
        res = real(*args, **kwargs)
        if args[2] == "identity":        # the block of "3.weight" (the second Linear), after 1.weight and 1.bias
            off = 12 * 16 + 16
            res.features[..., off:off + 256] *= 1 + 1e-3
        return res

    monkeypatch.setattr(check, "gradient_features", corrupt)
    res = check.check_model(model, x, sketch=None)
    assert not res.exact and res.refusal is None
    worst = max(res.per_parameter, key=lambda r: r["relative_error"])
    assert worst["name"] == "3.weight" and worst["relative_error"] == pytest.approx(1e-3, rel=1e-3)
    assert [r["name"] for r in res.per_parameter if not r["passed"]] == ["3.weight"]
    assert res.sketch is None and res.summary().startswith("NOT EXACT:") and "3.weight" in res.summary()


class TinyShift(nn.Module):
    """A parameter whose gradient is ~5e-8 of the whole Jacobian's: it must be judged against its own norm."""

    def __init__(self):
        super().__init__()
        self.a, self.fc = nn.Linear(12, 8), nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.ones(3))

    def forward(self, x):
        return self.fc(torch.tanh(self.a(x.flatten(1)))) + 1e-7 * self.scale * x.flatten(1)[:, :3]


@pytest.mark.parametrize("case", ["tiny gradient zeroed (float64)", "LayerNorm off by 5e-5 (float32)"])
def test_small_errors_the_old_rule_let_through_are_caught(monkeypatch, case):
    """Review findings: a parameter with a tiny gradient was compared against the whole Jacobian's norm
    (zeroing it passed), and the float32 tolerance of 1e-4 let a 5e-5 error through; both now fail."""
    import dntk.features.check as check

    torch.manual_seed(2)
    if case.startswith("tiny"):
        model, x, name, factor = TinyShift().double(), torch.randn(4, 3, 2, 2, dtype=torch.float64), "scale", 0.0
    else:
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3))
        x, name, factor = torch.randn(4, 3, 2, 2), "2.weight", 1 + 5e-5
    honest = check.check_model(model, x, sketch=None)
    assert honest.exact                                        # the engine itself is exact on both
    offsets, off = {}, 0
    for r in honest.per_parameter:
        offsets[r["name"]], off = (off, off + r["numel"]), off + r["numel"]
    real = check.gradient_features

    def corrupt(*args, **kwargs):
        res = real(*args, **kwargs)
        if args[2] == "identity":
            lo, hi = offsets[name]
            res.features[..., lo:hi] *= factor
        return res

    monkeypatch.setattr(check, "gradient_features", corrupt)
    res = check.check_model(model, x, sketch=None)
    assert not res.exact and [r["name"] for r in res.per_parameter if not r["passed"]] == [name]


def test_a_mathematically_zero_gradient_passes_on_its_rounding_noise():
    """A bias before a LayerNorm has zero gradient; computed, it is rounding noise ~u·‖J‖ — the absolute floor
    keeps it from failing (in float32, where that noise is largest)."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.LayerNorm(16, elementwise_affine=False), nn.Linear(16, 3))
    res = check_model(model, torch.randn(5, 3, 2, 2), sketch=None)
    assert res.exact and res.atol > 0


def test_modes_device_and_mixed_precision():
    """Each submodule's own mode comes back (a frozen BatchNorm stays in eval), and a float64 body with a
    float32 head is judged at float32."""
    torch.manual_seed(4)
    model = small_cnn_bn().double()
    model.train()
    model[1].eval()
    check_model(model, torch.randn(3, 3, 8, 8, dtype=torch.float64), sketch=None)
    assert model.training and not model[1].training and model[4].training
    mixed = mlp().double()
    mixed[-1].float()

    class Cast(nn.Module):
        def __init__(self, body):
            super().__init__()
            self.body = body

        def forward(self, x):
            h = self.body[:-1](x)
            return self.body[-1](h.float())

    res = check_model(Cast(mixed), torch.randn(4, 3, 2, 2, dtype=torch.float64), sketch=None)
    assert res.dtype == "float32" and res.exact


def test_frozen_and_tied_parameters_count_once_and_only_when_trainable():
    torch.manual_seed(5)

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Linear(12, 12, bias=False)
            self.frozen = nn.Linear(12, 12)
            self.frozen.requires_grad_(False)
            self.head = nn.Linear(12, 3)

        def forward(self, x):
            h = x.flatten(1)
            return self.head(torch.tanh(self.emb(torch.tanh(self.emb(self.frozen(h))))))

    model = Tied().double()
    res = check_model(model, torch.randn(4, 3, 2, 2, dtype=torch.float64), sketch=None)
    assert res.exact and res.parameters == 12 * 12 + 12 * 3 + 3
    assert [r["name"] for r in res.per_parameter] == ["emb.weight", "head.weight", "head.bias"]


def test_a_refused_model_is_a_result_not_an_error_and_bad_calls_are_named():
    torch.manual_seed(0)
    res = check_model(BatchCentred().double(), torch.randn(4, 3, 2, 2, dtype=torch.float64))
    assert not res.exact and res.refusal and "refused" in res.summary()
    assert res.max_relative_error is None and res.classes == 3
    # the user's mistakes are errors naming them, not refusals and not raw tracebacks
    with pytest.raises(dntk.DNTKError, match="forward on these inputs failed.*dtype"):
        check_model(nn.Linear(5, 3).double(), torch.randn(3, 5))

    with pytest.raises(dntk.DNTKError, match="returned tuple"):
        check_model(TupleOut(), torch.randn(3, 4))
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    with pytest.raises(dntk.DNTKError, match="at least 2 inputs"):
        check_model(mlp().double(), x[:1])
    with pytest.raises(dntk.DNTKError, match="tolerances must be > 0"):
        check_model(mlp().double(), x, tolerance=0)
    with pytest.raises(dntk.DNTKError, match="k must be"):
        check_model(mlp().double(), x, k=0)
    with pytest.raises(dntk.DNTKError, match="nn.Module"):
        check_model(lambda t: t, x)


def test_tolerances_follow_the_precision_and_the_kernel_grows_like_the_dot_product_rounding():
    from dntk.features.check import default_tolerances

    assert default_tolerances(torch.float64, 10 ** 8) == (1e-6, 1e-9)
    assert default_tolerances(torch.float32, 1000) == (1e-5, 1e-5)
    feat, kern = default_tolerances(torch.float32, 11_173_962)        # a ResNet-18
    assert feat == 1e-5 and kern == pytest.approx(4 * 11_173_962 ** 0.5 * 2.0 ** -24) and 7e-4 < kern < 9e-4
    feat, kern = default_tolerances(torch.bfloat16, 1000)             # half precision: 16 unit round-offs
    assert feat == pytest.approx(16 * 2.0 ** -8) and kern == pytest.approx(max(16, 4 * 1000 ** 0.5) * 2.0 ** -8)


def test_check_model_cli_exit_codes(tmp_path):
    """`dntk check-model`: 0 and a JSON report on an exact model (the embedded digits default), 3 on a user's
    model file the engine refuses, 1 on an error (a factory whose forward returns no logits)."""
    out = tmp_path / "ok"
    assert main(["check-model", "--n", "3", "--k", "64", "--quiet", "--out", str(out)]) == 0
    rep = json.loads((out / "check-model.json").read_text())
    assert rep["exact"] and rep["n"] == 3 and rep["sketch"]["k"] == 64
    f = tmp_path / "user_model.py"
    f.write_text("import torch.nn as nn\n"
                 "class Centred(nn.Module):\n"
                 "    def __init__(self, num_classes):\n"
                 "        super().__init__(); self.fc = nn.Linear(64, num_classes)\n"
                 "    def forward(self, x):\n"
                 "        h = x.flatten(1); return self.fc(h - h.mean(0, keepdim=True))\n"
                 "def build(num_classes):\n"
                 "    return Centred(num_classes)\n")
    bad = tmp_path / "bad"
    assert main(["check-model", "--model", f"{f}:build", "--quiet", "--out", str(bad)]) == 3
    rep = json.loads((bad / "check-model.json").read_text())
    assert not rep["exact"] and rep["refusal"]
    f.write_text(f.read_text() + "def pair(num_classes):\n    import torch.nn as nn\n"
                 "    class P(nn.Module):\n        def __init__(self):\n            super().__init__(); "
                 "self.fc = nn.Linear(64, num_classes)\n        def forward(self, x):\n"
                 "            return self.fc(x.flatten(1)), x\n    return P()\n")
    assert main(["check-model", "--model", f"{f}:pair", "--quiet", "--out", str(tmp_path / "err")]) == 1
