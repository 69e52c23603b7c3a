"""The call recorder: a :class:`~torch.overrides.TorchFunctionMode` that sees every torch call of one
forward pass, tells parameters, parameter-derived tensors and data apart, and records each call that
mixes data with parameters as a :class:`Use` for the op rules (:mod:`.rules`) to plan and emit."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from ...errors import DNTKError
from . import rules
from .params import ParameterTable

_INPLACE_DUNDER = {"__iadd__": "__add__", "__isub__": "__sub__", "__imul__": "__mul__", "__itruediv__": "__truediv__",
                   "__setitem__": None}
# Tensor methods whose other arguments contribute only a dtype, device or shape
_SHAPE_ONLY = {"to", "type_as", "expand_as", "view_as", "reshape_as", "new_zeros", "new_ones", "new_full", "new_empty",
               "new_tensor", "type"}


def _setitem(t, index, value):
    t[index] = value
    return t


def _name(func) -> str:
    return getattr(func, "__name__", None) or str(func)


class Source:
    """Where a weight/bias argument came from: a parameter (by name) or a derived tensor."""

    __slots__ = ("param", "tensor", "roots", "root", "std")

    def __init__(self, param: str | None, tensor: torch.Tensor | None, roots: tuple[str, ...], root=None):
        self.param, self.tensor, self.roots = param, tensor, roots
        self.root = root   # the pass's alias of the single root parameter of a derived tensor (else None)


@dataclass
class Use:
    """One recorded call that consumed parameters (or derived tensors) together with data."""

    kind: str                              # the kind of the op rule that recorded it, or "generic" (op-vjp)
    name: str                              # the torch function, for messages
    outs: list                             # recorded output tensors (graph nodes)
    roots: tuple[str, ...]                 # parameter names this call can send gradient to
    weight: Source | None = None
    bias: Source | None = None
    data: object = None                    # the rule's own record of the call's data (a dataclass of the rule)
    rule: object = None                    # the OpRule that recorded it (None: generic)
    out_index: list = field(default_factory=list)  # positions of outs among the call's tensor outputs
    cut: list | None = None                # outputs recomputed on detached data (op-vjp differentiates these)


def _out_of_place(func):
    name = _name(func)
    if name == "__setitem__":
        return _setitem
    if name in _INPLACE_DUNDER:
        return getattr(torch.Tensor, _INPLACE_DUNDER[name], None)
    if name.endswith("_") and not name.startswith("_"):
        return getattr(torch.Tensor, name[:-1], None)
    return None


def _is_inplace(func) -> bool:
    name = _name(func)
    return name in _INPLACE_DUNDER or (name.endswith("_") and not name.startswith("_"))


class Recorder(TorchFunctionMode):
    """The forward pass's call recorder (see the package docstring): tags parameter-derived tensors,
    runs derivations on per-pass aliases, and records every consumption as a :class:`Use`, classified
    by the op rule registered for its function (:mod:`.rules`) or left generic (op-vjp)."""

    def __init__(self, table: ParameterTable, pass_id: int):
        super().__init__()
        self.table = table
        self.pass_id = pass_id
        self.aliases: dict[str, torch.Tensor] = {}
        self.uses: list[Use] = []

    # -- tagging -----------------------------------------------------------------------------------
    def alias(self, name: str) -> torch.Tensor:
        a = self.aliases.get(name)
        if a is None:
            a = self.table.params[name].detach().requires_grad_(True)
            a._dntk_roots = (self.pass_id, (name,))
            self.aliases[name] = a
        return a

    def roots_of(self, t: torch.Tensor):
        """Parameter names t is derived from, or None when t is not parameter-derived."""
        name = self.table.names.get(id(t))
        if name is not None:
            return (name,)
        tag = getattr(t, "_dntk_roots", None)
        if tag is None or not t.requires_grad:
            return None  # data or a constant (a derived tensor made under no_grad or detached counts as one)
        pass_id, roots = tag
        if pass_id != self.pass_id:
            raise DNTKError("the model reuses a tensor it computed from its parameters in an earlier forward pass (a cached "
                            "derived weight); its gradient cannot be traced in this pass — disable the cache, or recompute "
                            "it in forward()")
        return roots

    @staticmethod
    def _mark_batched(out):
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                t._dntk_b = True
        return out

    # -- dispatch ----------------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        flat, spec = tree_flatten((args, kwargs))
        roots: list[str] = []
        tracked, batched = False, False
        for t in flat:
            if isinstance(t, torch.Tensor):
                r = self.roots_of(t)
                if r is not None:
                    tracked = True
                    roots.extend(x for x in r if x not in roots)
                elif getattr(t, "_dntk_b", False) or t.requires_grad:
                    # data: marked by the recorder, or any other non-derived tensor that requires grad (the
                    # input does, so data that passed through a call the recorder could not see still counts)
                    batched = True
        name = _name(func)
        inplace = _is_inplace(func)
        if not tracked:
            out = func(*args, **kwargs)
            if batched:
                self._mark_batched(out)
                if inplace and isinstance(args[0], torch.Tensor):
                    args[0]._dntk_b = True  # e.g. buf[:, :6] = x writes data into a fresh tensor
            return out
        if batched and name in _SHAPE_ONLY and isinstance(args[0], torch.Tensor) and self.roots_of(args[0]) is not None:
            batched = False  # p.to(x), p.type_as(x), p.expand_as(x): the data gives only a dtype, device or shape
        flat2 = [self.alias(self.table.names[id(t)]) if isinstance(t, torch.Tensor) and id(t) in self.table.names else t
                 for t in flat]
        args2, kwargs2 = tree_unflatten(flat2, spec)
        if not batched:  # a derivation: parameters (and constants) in, a parameter-derived tensor out
            if inplace and isinstance(args[0], torch.Tensor) and id(args[0]) in self.table.names:
                raise DNTKError(f"the model modifies the trainable parameter {self.table.names[id(args[0])]} in place "
                                f"({name}) during forward; per-sample gradients of a parameter that changes are not defined")
            out = func(*args2, **kwargs2)  # the ambient grad mode: a model's own no_grad blocks stay gradient-free
            tag = (self.pass_id, tuple(roots))
            for t in tree_flatten(out)[0] + ([args2[0]] if inplace and isinstance(args2[0], torch.Tensor) else []):
                if isinstance(t, torch.Tensor):
                    t._dntk_roots = tag
            return out
        rewrite = rules.rewrite_for(func)
        if rewrite is not None:
            res = rewrite(self, args2, kwargs2)
            if res is not None:
                return res
        return self.consume(func, args2, kwargs2, tuple(roots))

    def source(self, t) -> Source | None:
        if not isinstance(t, torch.Tensor):
            return None
        r = self.roots_of(t)
        if r is None:
            return None  # a constant (or data) in a weight slot: no parameter gradient flows there
        if len(r) == 1 and self.aliases.get(r[0]) is t:
            return Source(r[0], t, r)
        return Source(None, t, r, self.aliases.get(r[0]) if len(r) == 1 else None)

    def _cut(self, func, args, kwargs):
        """The call again with its data arguments detached: the graph of the result reaches the
        parameters through this call alone (not through earlier uses behind the data)."""
        flat, spec = tree_flatten((args, kwargs))
        flat = [t.detach() if isinstance(t, torch.Tensor) and self.roots_of(t) is None else t for t in flat]
        a, k = tree_unflatten(flat, spec)
        return func(*a, **k)

    def consume(self, func, args, kwargs, roots):
        """Record a call that mixes data with parameters (or derived tensors) and hand the network a clone
        of its output (an in-place call is computed out of place and copied into its target)."""
        if _is_inplace(func):
            base = _out_of_place(func)
            target = args[0]
            if base is None:
                raise DNTKError(f"the in-place call {_name(func)} mixes data and a trainable parameter and has no "
                                "out-of-place form dntk knows; write it out of place in the model")
            if self.table.names.get(id(target)) is not None or any(target is a for a in self.aliases.values()):
                raise DNTKError(f"the model modifies a trainable parameter in place ({_name(func)}) during forward; "
                                "per-sample gradients of a parameter that changes are not defined")
            tc = target.clone()
            res = base(tc, *args[1:], **kwargs)
            use = self._record(base, (tc,) + tuple(args[1:]), kwargs, res, roots)
            if use is not None and use.kind == "generic":
                tag = getattr(target, "_dntk_roots", None) if self.roots_of(target) is not None else None
                ct = target.clone() if tag is not None else target.detach().clone()
                if tag is not None:
                    ct._dntk_roots = tag  # a parameter-derived target keeps its graph in the cut call
                use.cut = self._pair(use, self._cut(base, (ct,) + tuple(args[1:]), kwargs))
            target.copy_(res)
            target._dntk_b = True
            if getattr(target, "_dntk_roots", None) is not None:
                target._dntk_roots = None  # parameter-derived until now; data from here on
            return None if _name(func) == "__setitem__" else target
        out = func(*args, **kwargs)
        use = self._record(func, args, kwargs, out, roots)
        if use is not None and use.kind == "generic":
            use.cut = self._pair(use, self._cut(func, args, kwargs))
        handed = tree_flatten(out)
        clones = [t.clone() if isinstance(t, torch.Tensor) else t for t in handed[0]]
        for t in clones:
            if isinstance(t, torch.Tensor):
                t._dntk_b = True
        return tree_unflatten(clones, handed[1])

    @staticmethod
    def _pair(use, cut_out):
        cuts = [t for t in tree_flatten(cut_out)[0] if isinstance(t, torch.Tensor)]
        return [cuts[i] if cuts[i].requires_grad else None for i in use.out_index]

    def _record(self, func, args, kwargs, out, roots):
        flat = tree_flatten(out)[0]
        index = [i for i, t in enumerate(t for t in flat if isinstance(t, torch.Tensor)) if t.requires_grad]
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        outs = [tensors[i] for i in index]
        if not outs:
            return None  # not differentiable with respect to the parameters: no gradient flows
        use = Use("generic", _name(func), outs, roots)
        rule = rules.rule_for(func)
        if rule is not None:
            try:
                rules.run_step(rule, "record", self, use, func, args, kwargs, out)
                use.kind, use.rule = rule.kind, rule
            except rules.NotHandled:
                use.weight, use.bias, use.data = None, None, None
        use.out_index = index
        self.uses.append(use)
        return use
