"""Op rules: what the engine knows about one family of torch calls, in one place.

A rule declares the torch functions it handles and four steps, each with its exactness argument and
cost in the rule's docstring:

``record(rec, use, func, args, kwargs, out)``
    During the forward pass, for a call that mixes data with parameters (or parameter-derived
    tensors): fill ``use.weight`` / ``use.bias`` (:class:`~dntk.features.capture.recorder.Source`,
    via ``rec.source``) and ``use.data`` (the rule's own record of the data it needs later, detached),
    or raise :class:`NotHandled` — the call then takes the generic ``op-vjp`` path, which is exact for
    any call.
``plan(use, layout, B)``
    Once per batch, with the measured :class:`~dntk.features.capture.layouts.Layout` of the call's
    first output (None for B = 1): a dict the rule reads back in ``emit``, or None when this layout
    is not one the closed form supports (then ``op-vjp``). A plan's ``"a"`` entry, when present, is
    the factor a [B, cols, T] of a weight gradient Σ_t g_t a_tᵀ (cached across the logits of a batch).
``emit(use, plan, g, B, acc)``
    Per logit: g is the output gradient split by sample, [B, ...]; hand the per-sample gradients to
    ``acc`` (:class:`~dntk.features.capture.emit.Accumulator`: ``weight``, ``bias``, ``factored``).
``recompute(use)``
    The call again from ``use.data`` and the weight/bias tensors, so that its graph reaches the
    parameters through this call alone (the op-vjp fallback of a recorded call whose layout the
    closed form does not support).

Built-in rules live in this package, one module per family (linear.py, conv.py, norms.py,
embedding.py); a rewrite (attention.py) turns one call into recorded calls of other rules. A new
rule is a subclass of :class:`OpRule` passed to :func:`register` — see docs/extending.md for a
worked example, and :func:`dntk.features.check_rule` to test it against brute-force autograd with the
rule asserted taken.
"""

from __future__ import annotations

from typing import Callable

import torch


class NotHandled(Exception):
    """Raised by a rule's ``record`` when this particular call is not one its closed form covers (the
    call is recorded for the generic op-vjp path instead)."""


class OpRule:
    """Base class of an op rule (see the package docstring). Subclasses set ``kind`` (a short name,
    used in ``GradientCapture.rules_taken``) and ``functions`` (the torch functions handled)."""

    kind: str = ""
    functions: tuple = ()

    def record(self, rec, use, func, args, kwargs, out) -> None:
        raise NotHandled

    def plan(self, use, layout, B: int) -> dict | None:
        return None

    def emit(self, use, plan: dict, g, B: int, acc) -> None:
        raise NotImplementedError

    def recompute(self, use):
        raise NotImplementedError


def run_step(rule: OpRule, step: str, *args):
    """``rule.<step>(*args)``. Any exception but NotHandled or a DNTKError is the rule's own bug, not the
    model's: raised as a DNTKError naming the rule and the step (else it would read as a failing forward)."""
    from ....errors import DNTKError

    try:
        return getattr(rule, step)(*args)
    except (NotHandled, DNTKError, MemoryError, torch.OutOfMemoryError):
        raise   # out of memory is the run's size, not the rule's bug
    except Exception as e:
        raise DNTKError(f"op rule {rule.kind!r} ({type(rule).__name__}) failed in {step} ({type(e).__name__}: {e}): a "
                        "bug in the rule, not in the model — fix the rule, or unregister it "
                        "(dntk.features.unregister) so that its calls take the generic op-vjp path") from e


def arg(args, kwargs, i: int, name: str, default=None):
    """Argument i of a call, positional or by keyword."""
    return args[i] if len(args) > i else kwargs.get(name, default)


_BY_FUNCTION: dict = {}
_REPLACED: dict = {}   # function -> the rules register(replace=True) displaced, restored by unregister
_REWRITES: dict = {}


def register(rule: OpRule, *, replace: bool = False) -> OpRule:
    """Make ``rule`` handle its ``functions`` in every capture from now on. A function another rule
    already handles is refused unless ``replace=True``. Returns the rule."""
    from ....errors import DNTKError

    if not isinstance(rule, OpRule) or not rule.kind or not rule.functions:
        raise DNTKError("register takes an OpRule instance with a kind and at least one function")
    taken = [f for f in rule.functions if f in _BY_FUNCTION and _BY_FUNCTION[f] is not rule]
    if taken and not replace:
        names = ", ".join(sorted({getattr(f, "__name__", str(f)) for f in taken}))
        raise DNTKError(f"{names} already handled by rule {_BY_FUNCTION[taken[0]].kind!r}; pass replace=True to "
                        "override it")
    same_kind = [r for r in set(_BY_FUNCTION.values()) if r.kind == rule.kind and r is not rule
                 and not set(r.functions) <= set(rule.functions)]
    if same_kind:
        raise DNTKError(f"another rule already has kind {rule.kind!r} (rules_taken counts by kind); choose another kind")
    missing = [m for m in ("record", "emit", "recompute") if getattr(type(rule), m) is getattr(OpRule, m)]
    if missing:
        raise DNTKError(f"rule {rule.kind!r} does not define {', '.join(missing)}: a rule records its calls (record), "
                        "hands their per-sample gradients to the accumulator (emit) and recomputes a call for the op-vjp "
                        "fallback (recompute) — see docs/extending.md")
    for f in rule.functions:
        if f in _BY_FUNCTION and _BY_FUNCTION[f] is not rule:
            _REPLACED.setdefault(f, []).append(_BY_FUNCTION[f])
        _BY_FUNCTION[f] = rule
    return rule


def unregister(rule: OpRule) -> None:
    """Remove ``rule`` from every function it handles (a test's or an experiment's rule); a rule it replaced
    (``register(..., replace=True)``) handles the function again."""
    for f in [f for f, r in _BY_FUNCTION.items() if r is rule]:
        previous = _REPLACED.get(f)
        if previous:
            _BY_FUNCTION[f] = previous.pop()
        else:
            del _BY_FUNCTION[f]


def rule_for(func) -> OpRule | None:
    return _BY_FUNCTION.get(func)


def register_rewrite(func, rewrite: Callable) -> None:
    """``rewrite(rec, args, kwargs)`` replaces a call of ``func`` by recorded calls (returns the call's
    result) or declines (returns None: the call is recorded as it is)."""
    _REWRITES[func] = rewrite


def rewrite_for(func) -> Callable | None:
    return _REWRITES.get(func)


def rules() -> dict[str, OpRule]:
    """{kind: rule} of every registered rule."""
    return {r.kind: r for r in _BY_FUNCTION.values()}

