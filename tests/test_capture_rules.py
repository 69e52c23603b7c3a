"""The op-rule registry: the built-in RMSNorm rule and a rule written here as a user would (a layer
scale ``x * gamma``), each checked against brute-force autograd with the rule asserted taken
(:func:`dntk.features.check_rule`), the same models with the rule removed (exact through op-vjp, so
the rule changes the path and not the numbers), and the registry's refusals. Also: every sink of the
package satisfies the :class:`Sink` protocol."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from dntk import DNTKError
from dntk.features import check_model, check_rule, gradient_features
from dntk.features import capture as cap
from dntk.features.capture.layouts import split_batch
from dntk.features.capture.rules import NotHandled, OpRule, arg, register, rule_for, unregister
from dntk.features.check import brute_force_jacobian


class RMSNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.norm = nn.RMSNorm(8, eps=1e-6)
        self.head = nn.Linear(8, 3)

    def forward(self, x):                    # x [B, T, 6]
        return self.head(self.norm(torch.tanh(self.inp(x))).mean(1))


class ScaleNet(nn.Module):
    """Layer scale (ConvNeXt, CaiT): h * gamma with gamma [d] broadcast over the last axis."""

    def __init__(self, seq_first=False):
        super().__init__()
        self.seq_first = seq_first
        self.inp = nn.Linear(5, 4)
        self.gamma = nn.Parameter(torch.randn(4))
        self.head = nn.Linear(4, 3)

    def forward(self, x):                    # x [B, T, 5]
        h = torch.tanh(self.inp(x))
        if self.seq_first:
            h = h.transpose(0, 1)            # [T, B, 4]: the samples in dim 1
        h = h * self.gamma
        return self.head(h.mean(1 if not self.seq_first else 0))


class LayerScaleRule(OpRule):
    """``data * gamma`` for a 1-D parameter gamma on the last axis: per sample ∂(g·y)/∂gamma = Σ g ⊙ data
    over every axis but the last (the chain rule; data does not depend on gamma)."""

    kind = "layer_scale"
    functions = (torch.Tensor.mul,)   # what `h * gamma` dispatches as

    def record(self, rec, use, func, args, kwargs, out):
        x, w = arg(args, kwargs, 0, "self"), arg(args, kwargs, 1, "other")
        if (not isinstance(w, torch.Tensor) or w.dim() != 1 or rec.roots_of(x) is not None
                or rec.roots_of(w) is None or not isinstance(out, torch.Tensor) or x.shape[-1] != w.shape[0]):
            raise NotHandled
        use.weight = rec.source(w)
        use.data = x.detach().clone()

    def plan(self, use, layout, B):
        if layout is not None and layout.dim == use.outs[0].dim() - 1:
            return None                      # the samples on gamma's own axis: op-vjp
        return {"layout": layout}

    def emit(self, use, plan, g, B, acc):
        xb = split_batch(use.data, plan["layout"], B)
        acc.weight(use, G=(g * xb).reshape(B, -1, xb.shape[-1]).sum(1))

    def recompute(self, use):
        return use.data * use.weight.tensor


@pytest.fixture
def layer_scale():
    rule = register(LayerScaleRule())
    try:
        yield rule
    finally:
        unregister(rule)
    assert rule_for(torch.Tensor.mul) is None


def _x(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_the_rms_norm_rule_is_taken_and_exact():
    torch.manual_seed(0)
    model, x = RMSNet(), _x(4, 5, 6)
    res = check_rule("rms_norm", model, x, sketch=None)
    assert res.rules_taken["rms_norm"] == 1
    assert {r["name"]: r["path"] for r in res.per_parameter}["norm.weight"] == "closed"
    # the same model without the rule: exact through op-vjp, the same features to float32 rounding
    rule = rule_for(F.rms_norm)
    unregister(rule)
    try:
        slow = check_model(model, x, sketch=None)
        assert slow.exact and "rms_norm" not in slow.rules_taken
        assert {r["name"]: r["path"] for r in slow.per_parameter}["norm.weight"] == "op-vjp"
        f_slow = gradient_features(model, x, "identity", batch_size=4, progress=False).features
    finally:
        register(rule)
    f_fast = gradient_features(model, x, "identity", batch_size=4, progress=False).features
    assert torch.allclose(f_fast, f_slow, rtol=1e-5, atol=1e-6 * float(f_slow.abs().max()))


def test_a_user_rule_is_taken_exact_and_falls_back_where_its_plan_declines(layer_scale):
    torch.manual_seed(1)
    model, x = ScaleNet(), _x(4, 3, 5)
    res = check_rule(layer_scale, model, x, sketch=None)
    assert res.rules_taken == {"linear": 2, "layer_scale": 1}
    assert {r["name"]: r["path"] for r in res.per_parameter}["gamma"] == "closed"
    # brute force, independently of check_model: the gamma block of the identity features
    J = brute_force_jacobian(model, x)                                  # [n, C, P]
    feats = gradient_features(model, x, "identity", batch_size=4, progress=False)
    specs = cap.parameter_table(model).specs
    off = sum(s.numel for s in specs[:[s.name for s in specs].index("gamma")])
    got = feats.features.transpose(0, 1)[..., off:off + 4]
    assert torch.allclose(got, J[..., off:off + 4].to(got), rtol=1e-5, atol=1e-7)
    # sequence-first ([T, B, d]: the samples in dim 1) is a layout the rule splits too
    seq = ScaleNet(seq_first=True)
    assert check_rule(layer_scale, seq, x, sketch=None).rules_taken["layer_scale"] == 1


def test_a_declining_plan_goes_op_vjp_and_stays_exact(layer_scale, monkeypatch):
    torch.manual_seed(2)
    model, x = ScaleNet(), _x(4, 3, 5)
    monkeypatch.setattr(LayerScaleRule, "plan", lambda self, use, layout, B: None)
    res = check_model(model, x, sketch=None)
    assert res.exact and "layer_scale" not in res.rules_taken
    assert {r["name"]: r["path"] for r in res.per_parameter}["gamma"] == "op-vjp"
    with pytest.raises(DNTKError, match="not taken"):
        check_rule(layer_scale, model, x, sketch=None)


def test_check_rule_catches_a_wrong_rule(layer_scale, monkeypatch):
    """A rule that is taken but wrong (it forgets to sum over the positions) fails check_rule."""
    torch.manual_seed(3)
    model, x = ScaleNet(), _x(4, 3, 5)

    def wrong(self, use, plan, g, B, acc):
        xb = split_batch(use.data, plan["layout"], B)
        acc.weight(use, G=(g * xb).reshape(B, -1, xb.shape[-1])[:, 0])

    monkeypatch.setattr(LayerScaleRule, "emit", wrong)
    with pytest.raises(DNTKError, match="not exact"):
        check_rule(layer_scale, model, x, sketch=None)


def test_the_registry_refuses_a_taken_function_and_a_non_rule():
    class Other(OpRule):
        kind = "other-linear"
        functions = (F.linear,)

    with pytest.raises(DNTKError, match="already handled by rule 'linear'"):
        register(Other())
    with pytest.raises(DNTKError, match="OpRule instance"):
        register(object())
    assert rule_for(F.linear).kind == "linear"


def test_every_sink_satisfies_the_protocol():
    from dntk.features.extract import _RowSink
    from dntk.features.ntk import _ExactSink
    from dntk.features.sliced import _SliceSink
    from dntk.projection import make

    sinks = [_RowSink(make("gaussian", k=4, seed=0), 2, "cpu"), _ExactSink(), _SliceSink({}, {})]
    assert all(isinstance(s, cap.Sink) for s in sinks)
    assert not isinstance(object(), cap.Sink)


def test_check_rule_tests_the_rule_object_and_the_registry_restores_what_it_replaced():
    """Review findings: an unregistered rule object of a built-in kind is refused, not passed on the built-in's
    behalf; a second rule of one kind is refused; unregistering a replacing rule restores the replaced one."""
    from dntk.features.capture.rules.norms import RMSNormRule

    torch.manual_seed(4)
    model, x = RMSNet(), _x(4, 5, 6)
    with pytest.raises(DNTKError, match="not the one registered"):
        check_rule(RMSNormRule(), model, x, sketch=None)

    class OtherLinear(OpRule):
        kind = "linear"
        functions = (torch.Tensor.mul,)

    with pytest.raises(DNTKError, match="already has kind 'linear'"):
        register(OtherLinear())
    builtin = rule_for(F.rms_norm)
    mine = register(RMSNormRule(), replace=True)
    assert rule_for(F.rms_norm) is mine and check_rule(mine, model, x, sketch=None).exact
    unregister(mine)
    assert rule_for(F.rms_norm) is builtin


def test_an_incomplete_rule_is_refused_and_a_rule_bug_is_named_as_the_rules():
    """A rule without emit/recompute is refused at register (it would fail mid-extraction with a bare
    NotImplementedError); an exception inside a user rule's record or emit is reported as that rule's bug,
    not as a failing model forward."""

    class NoEmit(OpRule):
        kind = "no-emit"
        functions = (torch.Tensor.mul,)

        def record(self, rec, use, func, args, kwargs, out):
            raise NotHandled

    with pytest.raises(DNTKError, match="does not define emit, recompute"):
        register(NoEmit())
    assert rule_for(torch.Tensor.mul) is None

    class Broken(LayerScaleRule):
        kind = "broken-scale"

        def record(self, rec, use, func, args, kwargs, out):
            return {}["no such key"]

    rule = register(Broken())
    try:
        torch.manual_seed(5)
        with pytest.raises(DNTKError, match=r"op rule 'broken-scale' \(Broken\) failed in record \(KeyError") as e:
            gradient_features(ScaleNet(), _x(4, 3, 5), "identity", progress=False)
        assert "forward pass failed" not in str(e.value)
    finally:
        unregister(rule)

    class BrokenEmit(LayerScaleRule):
        kind = "broken-emit"

        def emit(self, use, plan, g, B, acc):
            raise ValueError("shape mix-up")

    rule = register(BrokenEmit())
    try:
        with pytest.raises(DNTKError, match=r"op rule 'broken-emit' \(BrokenEmit\) failed in emit \(ValueError: shape mix-up"):
            gradient_features(ScaleNet(), _x(4, 3, 5), "identity", progress=False)
    finally:
        unregister(rule)


class Conv1DNet(nn.Module):
    """Hugging Face's ``Conv1D`` (GPT-2's projections) is ``torch.addmm(b, x.view(-1, in), W)``."""

    def __init__(self, seq_first=False):
        super().__init__()
        self.seq_first = seq_first
        self.w1, self.b1 = nn.Parameter(torch.randn(6, 8) * 0.3), nn.Parameter(torch.randn(8) * 0.1)
        self.w2, self.b2 = nn.Parameter(torch.randn(8, 3) * 0.3), nn.Parameter(torch.randn(3) * 0.1)

    def forward(self, x):                                   # [B, T, 6]
        if self.seq_first:
            x = x.transpose(0, 1).contiguous()              # [T, B, 6]: rows t·B + b after the view
        h = torch.tanh(torch.addmm(self.b1, x.reshape(-1, 6), self.w1)).view(*x.shape[:2], 8)
        return torch.addmm(self.b2, h.mean(0 if self.seq_first else 1), self.w2)


@pytest.mark.parametrize("seq_first", [False, True], ids=["rows-b-major", "rows-b-minor"])
def test_the_addmm_rule_is_taken_and_exact(seq_first):
    """``torch.addmm`` with parameter weight and bias (GPT-2's Conv1D) takes the factored/closed path and
    matches brute-force autograd, with the samples' rows in either order."""
    torch.manual_seed(6)
    model, x = Conv1DNet(seq_first), _x(5, 4, 6)
    res = check_rule(rule_for(torch.addmm), model, x, sketch=None)
    assert res.exact and res.rules_taken.get("addmm") == 2
    assert {p["path"] for p in res.per_parameter} == {"factored", "closed"}


def test_addmm_with_a_scale_goes_op_vjp_and_stays_exact():
    class Scaled(Conv1DNet):
        def forward(self, x):
            h = torch.tanh(torch.addmm(self.b1, x.reshape(-1, 6), self.w1, beta=0.5)).view(*x.shape[:2], 8)
            return torch.addmm(self.b2, h.mean(1), self.w2, alpha=2.0)

    torch.manual_seed(7)
    res = check_model(Scaled(), _x(4, 3, 6), sketch=None)
    assert res.exact and {p["path"] for p in res.per_parameter} == {"op-vjp"}


def test_engine_seconds_account_for_the_call_and_no_more():
    """FeatureResult.engine_seconds splits the engine's wall time into its phases (record, check, backward,
    emit, project): every phase ≥ 0, the forward and the backward passes > 0, and their sum within the
    call's own wall time (they are disjoint spans of it)."""
    import time

    torch.manual_seed(8)
    model, x = ScaleNet(), _x(6, 3, 5)
    t = time.perf_counter()
    res = gradient_features(model, x, "tensorsketch", k=16, batch_size=3, progress=False)
    wall = time.perf_counter() - t
    s = res.engine_seconds
    assert set(s) == {"record", "check", "backward", "emit", "project"}
    assert all(v >= 0 for v in s.values()) and s["record"] > 0 and s["backward"] > 0
    assert sum(s.values()) <= wall
    assert gradient_features(model, x, "identity", backend="func", progress=False).engine_seconds == {}
