"""Per-sample, per-logit parameter gradients, one parameter block at a time — correct or refuse.

How the engine works. One forward pass runs under a :class:`torch.overrides.TorchFunctionMode`
that sees every torch call. A call is *interesting* when one of its arguments is a trainable
parameter (matched by identity) or a tensor computed from parameters only:

- **derivations** — calls whose tensor arguments are parameters, parameter-derived tensors or
  constants, but no data (``w - w.mean()`` in a weight-standardised conv, ``g·v/‖v‖`` in
  weight norm, ``cls_token.expand(B, -1, -1)``, ``table[index]`` in Swin's relative position
  bias). They run on a per-pass *alias* of each parameter (a detached leaf that requires grad), so
  the derived tensor keeps an autograd graph back to its parameters.
- **consumptions** — calls that mix parameters (or derived tensors) with data. Each is computed
  on the aliases, its output is *recorded* (the graph node we differentiate against) and a clone
  is handed to the network, so later in-place operations cannot touch the recorded tensor.
  In-place consumptions (``x.mul_(gamma)``) are computed out of place and copied into ``x``.

Then, for each logit c, one backward of Σ_b f_c(x_b) to the recorded outputs gives every
sample's output gradient at once. Per-sample parameter gradients follow per recorded call:

=============  ==========================================================================  =========
path           calls                                                                        cost
=============  ==========================================================================  =========
``factored``   ``F.linear`` and ungrouped ``conv1d``/``conv2d`` with a parameter weight:     cheapest
               Σ_t g_t a_tᵀ handed to the projector as factors, never formed
``closed``     biases, norm affines (batch/layer/group norm), grouped/depthwise convs,     O(B·numel)
               embeddings: the per-sample block in closed form from the output gradient
``derived``    a closed-form call whose weight is a derived tensor: the per-sample block    O(B·numel)
               of the derived tensor is pulled back to its parameters by a batched vjp
``op-vjp``     any other call (layer scale ``x * gamma``, ``x + pos_embed``, ``cat`` with  O(B·op)
               a class token, ``multi_head_attention_forward``, ``conv3d``, ...): the
               call's own vjp with the output gradient masked to one sample at a time
=============  ==========================================================================  =========

Every path is exact; memory grows with the parameters of one call, never with the model's P.
Which path each parameter took is recorded (:attr:`GradientCapture.paths`).

Which entries belong to which sample. Nothing assumes the batch sits in dim 0 of a recorded
tensor (sequence-first ``[T, B, d]`` Linear inputs, ``[T·B, E]`` inside attention, ``[B·windows,
…]`` in Swin). On the first batch of every new call pattern the engine *measures* it: with
s_b = Σ_c r_c f_c(x_b) for random r, it backpropagates Σ_b s_b and, for each bit j of the sample
index, Σ_b 2^{bit_j(b)} s_b. An entry that feeds sample b only gets exactly 1× or 2× the first
gradient, which spells b in binary; an entry feeding several samples gets neither, and the
model is refused (it mixes the samples of a batch, so per-sample gradients of the batch are not
the model's gradients on single inputs). From the per-entry sample index the engine picks the
layout ``(dim, major|minor)`` that explains every entry (e.g. dim 1 for ``[T, B, d]``, dim 0
b-minor for ``[T·B, E]``); calls whose layout is not of that form use ``op-vjp`` with the
measured index map. Entries with zero gradient for a random combination of logits have zero
gradient for every logit (with probability one), so they cannot make the choice wrong.

When the measurement is unambiguous (one layout per recorded output) it is cached for that call
pattern (batch size, calls, parameters, output shapes), and each later batch of the pattern is
*verified* instead of measured: two backward passes, of Σ_b s_b and of Σ_b w_b s_b with w a random
permutation of 1..B, must agree entry by entry as w[sample] × plain (an entry feeding two samples is
off by at least its share), and the first sample run alone must give its batch logits. A batch that
fails is measured afresh — and refused if it mixes samples — so a model that mixes only on some
batches is still caught. The check is compared on the device and read back once per batch (a
measurement reads back hundreds of times). Batches with integer inputs (token ids) are measured every
time, all samples run alone: their mixing can bypass the gradient.

BatchNorm: the model runs in eval mode (running statistics; mode restored afterwards). A norm
that uses batch statistics couples the samples and is refused.

The generic ``torch.func`` backend (``backend="func"``, vmap(jacrev) over the whole model) is kept
as an independent reference; it builds B·C·P numbers and is never chosen automatically.
"""

from __future__ import annotations

import random
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from .. import samples
from ..errors import DNTKError
from ..projection.base import BlockSpec

PATHS = ("factored", "closed", "derived", "op-vjp", "func")


@dataclass
class ParameterTable:
    """The trainable parameters of a model, deduplicated (tied weights count once)."""

    names: dict[int, str]          # id(param) -> name
    params: dict[str, nn.Parameter]
    specs: list[BlockSpec]

    @property
    def num_params(self) -> int:
        return sum(s.numel for s in self.specs)


def parameter_table(model: nn.Module) -> ParameterTable:
    """Unique trainable parameters in ``model.named_parameters()`` order. Every parameter with
    two or more dimensions is a (rows = shape[0], cols = numel / rows) block for the projectors,
    whichever path its gradient takes, so the map S depends only on names and shapes."""
    names, params, specs = {}, {}, []
    for name, p in model.named_parameters():  # deduplicated by identity
        if not p.requires_grad:
            continue
        names[id(p)] = name
        params[name] = p
        factors = (p.shape[0], p.numel() // p.shape[0]) if p.dim() >= 2 and p.numel() > 0 else None
        specs.append(BlockSpec(name, p.numel(), factors))
    if not specs:
        raise DNTKError("the model has no parameters with requires_grad=True; unfreeze the parameters whose NTK you want")
    return ParameterTable(names, params, specs)


@contextmanager
def analysis_mode(model: nn.Module):
    """Eval mode for the duration of a pass (BatchNorm on running statistics); every submodule's own
    mode restored after (a model in train mode with a frozen BatchNorm in eval mode stays so)."""
    modes = [(m, m.training) for m in model.modules()]
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats:
            raise DNTKError(
                f"BatchNorm layer {type(m).__name__} has track_running_stats=False, so each sample's output depends on the "
                "rest of its batch and per-sample gradients are not defined; build it with track_running_stats=True")
    model.eval()
    try:
        yield
    finally:
        for m, was in modes:
            m.training = was


def check_logits(out, batch: int) -> torch.Tensor:
    out = samples.logits_of(out)
    if not isinstance(out, torch.Tensor):
        raise DNTKError(f"the model returned {type(out).__name__}, not a tensor of logits [batch, C]; "
                        "wrap it so forward() returns the logits tensor")
    if out.dim() != 2 or out.shape[0] != batch:
        raise DNTKError(f"the model output has shape {tuple(out.shape)}, expected [batch={batch}, C]; "
                        "flatten or select the logits so forward() returns a 2-D tensor")
    return out


# ------------------------------------------------------------------------------------------------
# recording
# ------------------------------------------------------------------------------------------------
_LINEAR = {F.linear, torch._C._nn.linear}
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__}
_CONV = {torch.conv1d: 1, torch.conv2d: 2, F.conv1d: 1, F.conv2d: 2}
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


class _Source:
    """Where a weight/bias argument came from: a parameter (by name) or a derived tensor."""

    __slots__ = ("param", "tensor", "roots")

    def __init__(self, param: str | None, tensor: torch.Tensor | None, roots: tuple[str, ...]):
        self.param, self.tensor, self.roots = param, tensor, roots


@dataclass
class _Use:
    """One recorded call that consumed parameters (or derived tensors) together with data."""

    kind: str                              # linear | conv | batch_norm | layer_norm | group_norm | embedding | generic
    name: str                              # the torch function, for messages
    outs: list                             # recorded output tensors (graph nodes)
    roots: tuple[str, ...]                 # parameter names this call can send gradient to
    weight: _Source | None = None
    bias: _Source | None = None
    data: dict = field(default_factory=dict)
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


class _Recorder(TorchFunctionMode):
    def __init__(self, table: ParameterTable, pass_id: int):
        super().__init__()
        self.table = table
        self.pass_id = pass_id
        self.aliases: dict[str, torch.Tensor] = {}
        self.uses: list[_Use] = []

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
        if func is F.multi_head_attention_forward:
            res = self._attention(args2, kwargs2)
            if res is not None:
                return res
        return self._consume(func, args2, kwargs2, tuple(roots))

    def _attention(self, args, kwargs):
        """``nn.MultiheadAttention`` as two recorded linear calls around scaled dot-product attention,
        for the standard configuration (packed in-projection, no bias_k/bias_v, no masks, no
        attention weights returned, eval mode); anything else returns None (op-vjp)."""
        names = ["query", "key", "value", "embed_dim_to_check", "num_heads", "in_proj_weight", "in_proj_bias",
                 "bias_k", "bias_v", "add_zero_attn", "dropout_p", "out_proj_weight", "out_proj_bias", "training",
                 "key_padding_mask", "need_weights", "attn_mask", "use_separate_proj_weight", "q_proj_weight",
                 "k_proj_weight", "v_proj_weight", "static_k", "static_v", "average_attn_weights", "is_causal"]
        defaults = {"training": True, "key_padding_mask": None, "need_weights": True, "attn_mask": None,
                    "use_separate_proj_weight": False, "static_k": None, "static_v": None, "is_causal": False}
        a = dict(defaults)
        a.update(zip(names, args))
        a.update(kwargs)
        q, k, v = a["query"], a["key"], a["value"]
        plain = (a["bias_k"] is None and a["bias_v"] is None and not a["add_zero_attn"] and not a["training"]
                 and a["key_padding_mask"] is None and not a["need_weights"] and a["attn_mask"] is None
                 and not a["use_separate_proj_weight"] and a["static_k"] is None and a["static_v"] is None
                 and not a["is_causal"] and q is k and k is v and isinstance(q, torch.Tensor) and q.dim() == 3
                 and self.roots_of(q) is None and a["in_proj_weight"] is not None)
        if not plain:
            return None
        T, Bq, E = q.shape
        H = int(a["num_heads"])
        if E % H or a["in_proj_weight"].shape != (3 * E, E):
            return None
        hd = E // H

        def linear(x, w, b):
            roots = tuple(n for t in (w, b) if isinstance(t, torch.Tensor) for n in (self.roots_of(t) or ()))
            return self._consume(F.linear, (x, w, b), {}, roots)

        proj = linear(q, a["in_proj_weight"], a["in_proj_bias"])                    # [T, B, 3E]
        qkv = proj.unflatten(-1, (3, H, hd)).permute(2, 1, 3, 0, 4)                 # [3, B, H, T, hd]
        att = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])                # [B, H, T, hd]
        att = att.permute(2, 0, 1, 3).reshape(T, Bq, E)
        out = linear(att, a["out_proj_weight"], a["out_proj_bias"])                 # [T, B, E]
        return out, None

    def _source(self, t) -> _Source | None:
        if not isinstance(t, torch.Tensor):
            return None
        r = self.roots_of(t)
        if r is None:
            return None  # a constant (or data) in a weight slot: no parameter gradient flows there
        if len(r) == 1 and self.aliases.get(r[0]) is t:
            return _Source(r[0], t, r)
        return _Source(None, t, r)

    def _cut(self, func, args, kwargs):
        """The call again with its data arguments detached: the graph of the result reaches the
        parameters through this call alone (not through earlier uses behind the data)."""
        flat, spec = tree_flatten((args, kwargs))
        flat = [t.detach() if isinstance(t, torch.Tensor) and self.roots_of(t) is None else t for t in flat]
        a, k = tree_unflatten(flat, spec)
        return func(*a, **k)

    def _consume(self, func, args, kwargs, roots):
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
        use = _Use("generic", _name(func), outs, roots)
        try:
            self._classify(use, func, args, kwargs, out)
        except _Generic:
            use.kind, use.weight, use.bias, use.data = "generic", None, None, {}
        use.out_index = index
        self.uses.append(use)
        return use

    def _classify(self, use, func, args, kwargs, out):
        """Fill use.kind/weight/bias/data for calls with a closed form; raise _Generic otherwise."""
        def arg(i, name, default=None):
            return args[i] if len(args) > i else kwargs.get(name, default)

        if func in _LINEAR:
            x, w, b = arg(0, "input"), arg(1, "weight"), arg(2, "bias")
            if self.roots_of(x) is not None or not isinstance(out, torch.Tensor) or x.dim() < 2:
                raise _Generic
            use.kind, use.weight, use.bias = "linear", self._source(w), self._source(b)
            use.data["x"] = x.detach().clone()
            return
        if func in _MATMUL:
            x, w = arg(0, "input"), arg(1, "other")
            if (self.roots_of(x) is not None or not isinstance(w, torch.Tensor) or w.dim() != 2 or x.dim() < 2
                    or self.roots_of(w) is None or not isinstance(out, torch.Tensor)):
                raise _Generic
            use.kind, use.weight = "matmul", self._source(w)
            use.data["x"] = x.detach().clone()
            return
        if func in _CONV:
            nd = _CONV[func]
            x, w, b = arg(0, "input"), arg(1, "weight"), arg(2, "bias")
            if self.roots_of(x) is not None or x.dim() != nd + 2 or not isinstance(out, torch.Tensor):
                raise _Generic
            stride, padding = arg(3, "stride", 1), arg(4, "padding", 0)
            dilation, groups = arg(5, "dilation", 1), arg(6, "groups", 1)
            kernel = tuple(w.shape[2:])
            stride, dilation = _tup(stride, nd), _tup(dilation, nd)
            xx = x.detach()
            if nd == 1:  # conv1d as a conv2d of height 1
                xx, kernel, stride, dilation = xx.unsqueeze(2), (1,) + kernel, (1,) + stride, (1,) + dilation
            if isinstance(padding, str):
                if padding == "valid":
                    pads = [(0, 0)] * len(kernel)
                elif padding == "same":
                    pads = []
                    for k_, d_ in zip(kernel, dilation):
                        total = d_ * (k_ - 1)
                        pads.append((total // 2, total - total // 2))
                else:
                    raise _Generic
            else:
                p = _tup(padding, nd)
                if nd == 1:
                    p = (0,) + p
                pads = [(q, q) for q in p]
            if any(lo != hi for lo, hi in pads):
                flat_pad = []
                for lo, hi in reversed(pads):
                    flat_pad += [lo, hi]
                xx, sym = F.pad(xx, flat_pad), (0, 0)
            else:
                sym = tuple(lo for lo, _ in pads)
            use.kind, use.weight, use.bias = "conv", self._source(w), self._source(b)
            use.data.update(a=F.unfold(xx, kernel, dilation=dilation, padding=sym, stride=stride), groups=int(groups))
            return
        if func is F.batch_norm:
            x, rm, rv = arg(0, "input"), arg(1, "running_mean"), arg(2, "running_var")
            w, b, training, eps = arg(3, "weight"), arg(4, "bias"), arg(5, "training", False), arg(7, "eps", 1e-5)
            if training or rm is None or rv is None:
                raise DNTKError("a batch_norm call uses the statistics of the batch (training=True or no running "
                                "statistics), so each sample's output depends on the rest of its batch and per-sample "
                                "gradients are not defined; use running statistics (eval mode, track_running_stats=True)")
            if self.roots_of(x) is not None or x.dim() < 2:
                raise _Generic
            shape = [1, -1] + [1] * (x.dim() - 2)
            xhat = (x.detach() - rm.detach().view(shape)) * torch.rsqrt(rv.detach().view(shape) + eps)
            use.kind, use.weight, use.bias = "batch_norm", self._source(w), self._source(b)
            use.data.update(xhat=xhat, channel=1)
            return
        if func is F.group_norm:
            x, G, w, b, eps = arg(0, "input"), arg(1, "num_groups"), arg(2, "weight"), arg(3, "bias"), arg(4, "eps", 1e-5)
            if self.roots_of(x) is not None or x.dim() < 2:
                raise _Generic
            use.kind, use.weight, use.bias = "group_norm", self._source(w), self._source(b)
            use.data.update(xhat=F.group_norm(x.detach(), G, None, None, eps), channel=1)
            return
        if func is F.layer_norm:
            x, shape, w, b, eps = arg(0, "input"), arg(1, "normalized_shape"), arg(2, "weight"), arg(3, "bias"), arg(4, "eps", 1e-5)
            if self.roots_of(x) is not None:
                raise _Generic
            shape = tuple(shape) if not isinstance(shape, int) else (shape,)
            use.kind, use.weight, use.bias = "layer_norm", self._source(w), self._source(b)
            use.data.update(xhat=F.layer_norm(x.detach(), shape, None, None, eps), nd=len(shape))
            return
        if func is F.embedding:
            idx, w = arg(0, "input"), arg(1, "weight")
            padding_idx, max_norm = arg(2, "padding_idx"), arg(3, "max_norm")
            if arg(5, "scale_grad_by_freq", False):
                raise DNTKError("an embedding with scale_grad_by_freq=True scales its gradient by how often each index "
                                "occurs in the whole batch, which couples the samples; per-sample gradients are not "
                                "defined — build it with scale_grad_by_freq=False")
            if max_norm is not None or self.roots_of(idx) is not None:
                raise _Generic
            use.kind, use.weight = "embedding", self._source(w)
            if padding_idx is not None and padding_idx < 0:
                padding_idx += w.shape[0]
            use.data.update(idx=idx.detach().clone(), padding_idx=padding_idx)
            return
        raise _Generic


class _Generic(Exception):
    pass


def _tup(v, n):
    if isinstance(v, (tuple, list)):
        return tuple(int(u) for u in v)
    return (int(v),) * n


# ------------------------------------------------------------------------------------------------
# sample layouts
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Layout:
    """Where the samples of a batch sit in a recorded tensor: dim ``dim`` of size B·r holds sample
    b at indices b·r … b·r + r − 1 (``major``) or at b, b + B, … (``minor``). B = 1 needs none."""

    dim: int
    order: str  # "major" | "minor"


def split_batch(t: torch.Tensor, layout, B: int) -> torch.Tensor:
    """[..., N = B·r at layout.dim, ...] → [B, ...] with the r entries in the old place, so that
    dim i of t is dim i + 1 of the result."""
    if layout is None:
        return t.unsqueeze(0)
    d = layout.dim
    r = t.shape[d] // B
    if layout.order == "major":
        return t.unflatten(d, (B, r)).movedim(d, 0)
    return t.unflatten(d, (r, B)).movedim(d + 1, 0)


def _sample_ids(shape, layout: Layout, B: int, device) -> torch.Tensor:
    N = shape[layout.dim]
    ar = torch.arange(N, device=device)
    ids = ar // (N // B) if layout.order == "major" else ar % B
    view = [1] * len(shape)
    view[layout.dim] = N
    return ids.view(view).expand(shape)


def _masked(g: torch.Tensor, layout, B: int, ids: torch.Tensor | None, bs: slice) -> torch.Tensor:
    """Output gradient g split into one cotangent per sample of bs: [len(bs), *g.shape]."""
    samples = torch.arange(B, device=g.device)[bs]
    if layout is None and ids is None:
        return g.unsqueeze(0)
    if ids is None:
        ids = _sample_ids(g.shape, layout, B, g.device)
    mask = ids.unsqueeze(0) == samples.view(-1, *([1] * g.dim()))
    return g.unsqueeze(0) * mask.to(g.dtype)


def _differs(alone: list, batch: list, share: float = 0.1) -> torch.Tensor:
    """A device bool: whether the input gradients of a sample run alone and the same sample's in the batch
    differ grossly — ‖a − b‖ > share · max(‖a‖, ‖b‖) for some input (a gradient missing on one side counts
    as zero). Meant for a gradient cut or changed by the batch context (a detach taken only in some
    batches), not for rounding: batch and single-sample passes round differently, and saturated layers
    amplify that, so a tight tolerance would refuse valid models."""
    bad = None
    for a, b in zip(alone, batch):
        if a is None and b is None:
            continue
        ref = (a if a is not None else b).double()
        a = torch.zeros_like(ref) if a is None else a.double()
        b = torch.zeros_like(ref) if b is None else b.reshape(ref.shape).double()
        ok = torch.isfinite(a) & torch.isfinite(b)           # non-finite entries are left to the finite checks
        a, b = torch.where(ok, a, 0.0), torch.where(ok, b, 0.0)
        one = (a - b).norm() > share * torch.maximum(a.norm(), b.norm())
        bad = one if bad is None else bad | one
    return bad if bad is not None else torch.zeros((), dtype=torch.bool)


def _to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A small CPU tensor on ``device``; pinned and non-blocking on CUDA (no host synchronisation)."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


class _LayoutError(Exception):
    pass


def _spell_samples(g1, qs, where, tol, B, i) -> torch.Tensor:
    """Sample index of every entry in ``where``: bit j is 1 where the pass weighted 2^{bit_j(b)} gave
    2× the plain gradient g1, 0 where it gave 1×. Anything else feeds several samples: _LayoutError(i)."""
    ids = torch.zeros(g1.shape, dtype=torch.long, device=g1.device)
    for j, q in enumerate(qs):
        q = q if q is not None else torch.zeros_like(g1)
        one, two = (q - g1).abs() <= tol, (q - 2 * g1).abs() <= tol
        if not bool((one | two)[where].all()):
            raise _LayoutError(i)
        ids |= two.long() << j
    if bool((ids[where] >= B).any()):
        raise _LayoutError(i)
    return ids


def measure_layouts(logits: torch.Tensor, outs: list, seed: int = 0) -> tuple[list, bool, list]:
    """For each recorded output: a :class:`Layout`, an index tensor (sample of every entry, when no
    layout explains it), or None (no gradient reaches it in this batch); whether every layout was
    the only one consistent with the batch; and per output whether no path of the graph reaches it at
    all (``unused``: autograd returns no gradient — structural, unlike an all-zero gradient of this
    batch). Raises _LayoutError(i) when an entry of output i feeds several samples."""
    B, C = logits.shape
    gen = torch.Generator().manual_seed(7919 + seed)
    r = (torch.rand(C, generator=gen, dtype=torch.float64) + 0.5).to(logits.dtype).to(logits.device)
    s = logits @ r
    nbits = max(1, (B - 1).bit_length())

    def grads(w):
        out = torch.autograd.grad((s * w).sum(), outs, retain_graph=True, allow_unused=True)
        return list(out)

    base = grads(torch.ones(B, dtype=s.dtype, device=s.device))
    ar = torch.arange(B, device=s.device)
    bits = [grads((((ar >> j) & 1) + 1).to(s.dtype)) for j in range(nbits)]
    layouts, unique = [], True
    for i, o in enumerate(outs):
        g1 = base[i]
        if g1 is None:
            layouts.append(None)
            continue
        finite = torch.isfinite(g1)
        mag = torch.where(finite, g1.abs(), torch.zeros_like(g1))
        top = float(mag.max()) if mag.numel() else 0.0
        if top == 0.0:
            if not bool(finite.all()):
                raise DNTKError("non-finite gradients in the batch, everywhere in a layer's output; check the inputs for "
                                "NaN/inf and the model for overflow (e.g. run in float64)")
            layouts.append(None)
            continue
        eps = torch.finfo(g1.dtype).eps
        support = mag > top * 1e3 * eps   # non-finite entries are left out; the layout carries them to their samples
        tol = 1e-3 * mag + top * 1e2 * eps
        qs = [bits[j][i] for j in range(nbits)]
        ids = _spell_samples(g1, qs, support, tol, B, i)
        found, matches = None, 0
        for d in range(o.dim()):
            if o.shape[d] % B:
                continue
            # a dimension of exactly B entries has one layout: 'major' and 'minor' name the same map (b ↦ b), so
            # counting both would make every batch-first output ambiguous and nothing would ever be cached
            for order in ("major",) if o.shape[d] == B else ("major", "minor"):
                lay = Layout(d, order)
                if bool((_sample_ids(o.shape, lay, B, o.device) == ids)[support].all()):
                    matches += 1
                    found = found or lay
        if matches != 1:
            unique = False  # several layouts (or none) explain this batch: valid here, not cached
        if found is None:
            # an index map for this batch: every entry with any gradient must be classified
            full = finite & (g1 != 0)
            if bool((full & ~support).any()):
                ids = _spell_samples(g1, qs, full, 1e-3 * g1.abs(), B, i)
            ids = ids.masked_fill(~full, 0)
        layouts.append(found if found is not None else ids)
    return layouts, unique, [g is None for g in base]


# ------------------------------------------------------------------------------------------------
# the capture
# ------------------------------------------------------------------------------------------------
class GradientCapture:
    """Computes per-sample, per-logit gradients of one batch and feeds them to a sink.

    Sink protocol (any object with these two methods):
        ``block(c, name, block[B, numel])`` — a materialised per-sample gradient block;
        ``outer(c, name, g[B, rows, T], a[B, cols, T], fixed_a=True)`` — a weight gradient Σ_t g_t a_tᵀ
        in factors; ``fixed_a`` says a is the same tensor for every logit of the batch (so a sink may
        cache transforms of it).
    ``c`` is the position of the logit in ``classes``. A parameter may receive one ``outer`` and
    one ``block`` per logit (its uses of each kind summed).

    ``paths`` maps each parameter name to the set of paths its gradient has taken so far
    (``factored``, ``closed``, ``derived``, ``op-vjp``; see the module docstring).
    """

    def __init__(self, model: nn.Module, backend: str = "auto"):
        from ..validate import real_model

        real_model(model)
        self.model = model
        self.table = parameter_table(model)
        if backend == "hooks":  # the historical name of the default engine
            backend = "ops"
        if backend == "auto":
            backend = "ops"
        if backend not in ("ops", "func"):
            raise DNTKError(f"unknown backend {backend!r}; use 'auto' (= 'ops'), 'ops' or 'func'")
        self.backend = backend
        self.paths: dict[str, set[str]] = {}
        self._layouts: dict[tuple, list] = {}
        self._passes = 0
        self.measured = 0      # batches whose layouts were measured (measure_layouts + samples run alone)
        self.verified = 0      # batches that reused cached layouts, verified by _still_holds
        self.remeasured = 0    # batches the cached layouts did not explain (measured afresh: refused if they mix)

    @property
    def specs(self) -> list[BlockSpec]:
        return self.table.specs

    def path_summary(self) -> dict[str, str]:
        """{parameter name: 'factored' | 'closed' | … joined by '+'}; 'none' when no gradient has reached it."""
        return {n: "+".join(p for p in PATHS if p in self.paths.get(n, ())) or "none" for n in self.table.params}

    def run(self, x, classes: list[int] | None, sink) -> torch.Tensor:
        """Feed the gradients of batch x to ``sink``; return the logits [B, C] (detached). x: a tensor
        [B, ...], a tuple (positional) or a dict (keyword) of tensors [B, ...] (:mod:`dntk.samples`)."""
        if torch.is_inference_mode_enabled():
            # under torch.inference_mode() no autograd graph is recorded, so every gradient would silently be
            # zero: leave it for the pass, with the inputs copied into ordinary tensors (exact, as outside)
            with torch.inference_mode(False):
                x = samples.map_leaves(torch.clone, x)
                inference = [n for n, p in self.table.params.items() if p.is_inference()]
                if inference:
                    raise DNTKError(f"parameters {', '.join(inference[:5])} were created under torch.inference_mode(), "
                                    "so autograd cannot differentiate them; build or load the model outside "
                                    "inference_mode (torch.no_grad() is fine)")
                return self.run(x, classes, sink)
        if self.backend == "ops":
            with torch.enable_grad():  # also when called under no_grad: the engine differentiates
                return self._run_ops(x, classes, sink)
        return self._run_func(x, classes, sink)

    # -- op-level engine -----------------------------------------------------------------------------
    def _run_ops(self, x, classes, sink):
        model, table = self.model, self.table
        self._passes += 1
        rec = _Recorder(table, self._passes)
        B = samples.count(x)
        with analysis_mode(model), torch.enable_grad():
            leaves = []   # the floating inputs, differentiated for the sample-mixing check; integer inputs are data

            def tag(t):
                leaf = t.detach()
                if leaf.is_floating_point():
                    leaf.requires_grad_(True)
                    leaves.append(leaf)
                    leaf = leaf.clone()  # not a leaf: the model may modify its input in place
                leaf._dntk_b = True
                return leaf

            xin = samples.map_leaves(tag, x)
            rng = _rng_states(x)
            try:
                with rec:
                    out = samples.call(model, xin)
            except DNTKError:
                raise
            except Exception as e:
                compiled = compiled_parts(model)
                hint = (f"; {compiled[0]} is compiled, scripted or traced code, which cannot be recorded call by call — "
                        "pass the plain eager module, or use backend='func'" if compiled else
                        "; check that the inputs have the shape and dtype the model expects (run "
                        "model(inputs[:2]) to see the same error outside dntk)")
                raise DNTKError(f"the model's forward pass failed under dntk's call recorder ({type(e).__name__}: {e}) "
                                f"on inputs {samples.describe(x)}{hint}") from e
            if _rng_states(x) != rng:
                raise DNTKError(random_forward_message("it drew random numbers from torch's generator during the pass"))
            logits = check_logits(out, B)
        classes = _resolve_classes(classes, logits.shape[1])
        uses = rec.uses
        self._aliases = rec.aliases
        outs = [o for u in uses for o in u.outs]
        if logits.requires_grad:
            # every use of a parameter the recorder saw went through an alias; a path from the logits to the
            # parameter itself is a use it could not see (custom autograd.Function, TorchScript, a weight cached
            # outside the pass) whose gradient would be silently missing
            params = list(table.params.values())
            reach = torch.autograd.grad(logits.sum(), params, retain_graph=True, allow_unused=True)
            hidden = [n for n, g in zip(table.params, reach) if g is not None]
            if hidden:
                raise DNTKError(
                    f"parameters {', '.join(hidden[:5])}{' ...' if len(hidden) > 5 else ''} reach the logits through a "
                    "call dntk cannot see (a custom autograd.Function, TorchScript/compiled code, or a tensor computed "
                    "from them before this forward pass and cached); their per-sample gradients would be wrong — "
                    "write that part in plain torch operations, or use backend='func'")
        if logits.requires_grad and not getattr(logits, "_dntk_b", False):
            raise DNTKError("the logits do not depend on the input as far as dntk can trace (the data left torch, e.g. "
                            "through .item(), .tolist() or int(), before reaching the parameters); per-sample "
                            "gradients cannot be attributed — keep the computation in torch tensor operations")
        if B == 1 and self._passes == 1:
            self._check_repeatable(x, logits)   # a random forward drawing from its own generator differs on a rerun
        if not logits.requires_grad or not outs:
            return logits.detach()  # no trainable parameter reaches the logits: every gradient is zero

        layouts = [None] * len(outs)
        if B > 1:
            sig = (B, tuple((u.name, u.roots, tuple(tuple(o.shape) for o in u.outs)) for u in uses))
            # entries that are not differentiated (integer token ids, masks) can mix samples unseen by the
            # weighted backward passes: such batches are measured (and every sample run alone) every time
            data_only = any(not t.is_floating_point() for t in samples.leaves(x))
            layouts = None if data_only else self._layouts.get(sig)
            if layouts is not None and not self._still_holds(x, logits, outs + leaves, layouts, B):
                layouts = None   # this batch is not explained by the cached layouts: measured afresh below
                self.remeasured += 1
            if layouts is None:
                probe = outs + leaves
                try:
                    measured, unique, unused = measure_layouts(logits, probe)
                    for j in range(len(outs), len(probe)):
                        if measured[j] is not None and measured[j] != Layout(0, "major"):
                            raise _LayoutError(j)
                except _LayoutError as e:
                    where = ("the input" if e.args[0] >= len(outs) else
                             f"the output of {_owner(uses, e.args[0]).name} (parameters {', '.join(_owner(uses, e.args[0]).roots)})")
                    raise DNTKError(
                        f"the samples of a batch interact in the model: an entry of {where} influences the logits of "
                        "more than one sample, so per-sample gradients of a batch are not the model's gradients on "
                        "single inputs; use batch_size=1, or remove the cross-sample operation (e.g. batch "
                        "statistics)") from None
                # then every sample of the batch is run alone, not just the first few
                self._check_alone(x, logits, n=B if data_only else 4)
                if not data_only:
                    self._check_alone_gradients(x, logits, leaves, n=min(B, 4))
                layouts = measured[: len(outs)]
                self.measured += 1
                if unique and not data_only and all(isinstance(lay, Layout) or (lay is None and unused[i])
                                                    for i, lay in enumerate(layouts)):
                    # unambiguous and structural: reused for the same call pattern, each later batch verified by
                    # _still_holds (two weighted backward passes and one sample alone instead of a measurement)
                    self._layouts[sig] = layouts
        per_use, k = [], 0
        for u in uses:
            per_use.append(layouts[k : k + len(u.outs)])
            k += len(u.outs)

        plans = [self._plan(u, lays, B) for u, lays in zip(uses, per_use)]
        factors: dict[str, list] = {}
        for u, plan in zip(uses, plans):
            if plan.get("a") is not None and u.weight is not None and u.weight.param is not None:
                factors.setdefault(u.weight.param, []).append(plan["a"])
        a_cat = {n: (fs[0] if len(fs) == 1 else torch.cat(fs, -1)) for n, fs in factors.items()}

        for ci, c in enumerate(classes):
            gs = torch.autograd.grad(logits[:, c].sum(), outs, retain_graph=True, allow_unused=True)
            g_fac: dict[str, list] = {}
            blocks: dict[str, torch.Tensor] = {}
            k = 0
            for u, plan in zip(uses, plans):
                g_u = gs[k : k + len(u.outs)]
                k += len(u.outs)
                if all(g is None for g in g_u) and plan.get("a") is None:
                    continue  # unreachable from the logits: zero gradient (factored uses still add zero columns)
                self._emit(u, plan, g_u, B, g_fac, blocks)
            for name, gl in g_fac.items():
                if isinstance(name, tuple):  # x @ W: the column side changes with the logit, so no a-side cache
                    rows = torch.cat([r for r, _ in gl], -1)
                    cols = torch.cat([c for _, c in gl], -1)
                    sink.outer(ci, name[1], rows, cols, fixed_a=False)
                else:
                    sink.outer(ci, name, gl[0] if len(gl) == 1 else torch.cat(gl, -1), a_cat[name])
            for name, blk in blocks.items():
                sink.block(ci, name, blk)
        self._aliases = {}
        return logits.detach()

    def _check_repeatable(self, x, logits):
        """The same batch run again (no grad) gives the same logits, or the forward is random (it draws from
        a generator of its own, which the global-RNG check cannot see)."""
        with torch.no_grad(), analysis_mode(self.model):
            again = check_logits(samples.call(self.model, samples.map_leaves(torch.clone, x)), samples.count(x))
        ref = logits.detach()
        tol = (1e-9 if ref.dtype == torch.float64 else 1e-4) * (float(ref.abs().max()) + 1.0)
        if bool(torch.isfinite(ref).all()) and float((again - ref).abs().max()) > tol:
            raise DNTKError(random_forward_message("the same input run twice gave different logits"))

    def _still_holds(self, x, logits, probe: list, layouts: list, B: int) -> bool:
        """Whether cached ``layouts`` still explain this batch, checked on the device and read back once:

        - gradients: one backward pass of s = logits · r and one of Σ_b w_b s_b with distinct weights w = a
          random permutation of 1..B. Where every entry of every recorded output (and of the inputs, layout
          0-major) feeds its own sample only, the weighted gradient is w[sample] × the plain one; an entry
          feeding samples b ≠ b' is off by (w_b' − w_b) × its share ≥ its share. Compared on the entries
          measure_layouts classifies (|g| > 1e3·eps·max), relative tolerance w[sample]·rtol (1e-8 in float64,
          1e-4 otherwise) — so at B·rtol > 0.05 the batch is measured instead; an entry with a weighted
          gradient where the plain one vanishes (cancelling shares) also fails. An output cached as unused
          must still get no gradient.
        - values, for coupling the gradient cannot see (integer routing, detached values, queues in batch
          order): the batch run again in a random order must give the same logits permuted; sample 0 and a
          random sample j ≥ 1 run alone must give their batch logits and (within 10%, :func:`_differs`) their
          input gradients in the batch."""
        dev, dt = logits.device, logits.dtype
        eps = torch.finfo(dt).eps
        rtol = 1e-8 if dt == torch.float64 else 1e-4
        if B * rtol > 0.05:
            return False   # the weights' gaps are too small against the tolerance: measure this batch
        gen = torch.Generator().manual_seed(7919 + self._passes)
        r = torch.rand(logits.shape[1], generator=gen, dtype=torch.float64) + 0.5
        w = (torch.randperm(B, generator=gen) + 1).to(torch.float64)
        perm = torch.randperm(B, generator=gen)
        j = random.Random(7919 + self._passes).randrange(1, B)   # a host draw: no tensor read back
        r, w = (_to_device(t.to(dt), dev) for t in (r, w))
        perm_dev = _to_device(perm, dev)
        s = logits @ r
        base = torch.autograd.grad(s.sum(), probe, retain_graph=True, allow_unused=True)
        weighted = torch.autograd.grad((s * w).sum(), probe, retain_graph=True, allow_unused=True)
        n_out = len(layouts)
        lays = list(layouts) + [Layout(0, "major")] * (len(probe) - n_out)
        bad = torch.zeros((), dtype=torch.bool, device=dev)
        for g1, gw, lay in zip(base, weighted, lays):
            if lay is None:                         # cached as unused: no graph path may reach it now
                if g1 is not None or gw is not None:
                    return False
                continue
            if g1 is None or gw is None:
                if (g1 is None) != (gw is None):
                    return False
                continue
            e = torch.finfo(g1.dtype).eps
            finite = torch.isfinite(g1) & torch.isfinite(gw)
            mag = torch.where(finite, g1.abs(), torch.zeros_like(g1))
            top = mag.amax()
            support = mag > top * 1e3 * e
            wi = w.to(g1.dtype)[_sample_ids(g1.shape, lay, B, g1.device)]
            off = (gw - g1 * wi).abs()
            bad = bad | (finite & support & (off > wi * (rtol * mag + top * 1e2 * e))).any()
            bad = bad | (finite & ~support & (gw.abs() > B * top * 1e4 * e)).any()
        leaves = probe[n_out:]
        with torch.no_grad(), analysis_mode(self.model):
            again = samples.call(self.model, samples.map_leaves(torch.clone, samples.take(x, perm_dev)))
        ref = logits.detach()[perm_dev]
        if again.shape != ref.shape:
            return False
        ftol = (1e-9 if dt == torch.float64 else 1e-4) * (ref.abs().amax() + 1.0)
        bad = bad | (torch.isfinite(ref).all() & ((again - ref).abs().amax() > ftol))
        for i in (0, j):
            alone, grads = self._alone(x, i, r, with_grad=bool(leaves))
            ref = logits[i:i + 1].detach()
            if alone.shape != ref.shape:
                return False
            tol = (1e-9 if dt == torch.float64 else 1e-4) * (ref.abs().amax() + 1.0)
            bad = bad | (torch.isfinite(ref).all() & ((alone - ref).abs().amax() > tol))
            if grads is not None:
                bad = bad | _differs(grads, [None if g is None else g[i:i + 1] for g in base[n_out:]]).to(dev)
        self.verified += 1
        return not bool(bad)   # the one read-back of the check

    def _alone(self, x, i: int, r: torch.Tensor, with_grad: bool):
        """Sample i run alone: its logits [1, C] and, with_grad, the gradients of its s = logits · r with
        respect to its floating inputs (else None)."""
        one = samples.map_leaves(torch.clone, samples.take(x, slice(i, i + 1)))
        if not with_grad:
            with torch.no_grad(), analysis_mode(self.model):
                return samples.call(self.model, one), None
        leaves = []

        def tag(t):
            if t.is_floating_point():
                leaf = t.detach().requires_grad_(True)
                leaves.append(leaf)
                return leaf.clone()   # not a leaf: the model may modify its input in place
            return t

        one = samples.map_leaves(tag, one)
        with torch.enable_grad(), analysis_mode(self.model):
            out = samples.call(self.model, one)
            if not out.requires_grad:
                return out.detach(), [None] * len(leaves)
            grads = torch.autograd.grad((out @ r.to(out.dtype)).sum(), leaves, allow_unused=True)
        return out.detach(), list(grads)

    def _check_alone_gradients(self, x, logits, leaves, n: int = 4):
        """A measured batch: the input gradients of a few samples run alone must be their input gradients in
        the batch (a model that cuts the gradient, e.g. detaches, only in some batch contexts would
        otherwise give other per-sample gradients than the model alone, with the same logits)."""
        if not leaves or not logits.requires_grad:
            return
        gen = torch.Generator().manual_seed(104729 + self._passes)
        r = (torch.rand(logits.shape[1], generator=gen, dtype=torch.float64) + 0.5).to(logits.dtype).to(logits.device)
        batch = torch.autograd.grad((logits @ r).sum(), leaves, retain_graph=True, allow_unused=True)
        for i in range(min(n, samples.count(x))):
            _, alone = self._alone(x, i, r, with_grad=True)
            if bool(_differs(alone, [None if g is None else g[i:i + 1] for g in batch])):
                raise DNTKError(
                    f"the model's gradient for sample {i} depends on the rest of its batch (its input gradient "
                    "differs when it is run alone, though its logits may not), so per-sample gradients of a batch "
                    "are not defined; use batch_size=1, or remove the batch-dependent operation")

    def _check_alone(self, x, logits, n: int = 4):
        """The logits of a few samples computed alone must equal their logits in the batch (catches
        models whose outputs mix samples through values the gradient test cannot see)."""
        with torch.no_grad(), analysis_mode(self.model):
            for i in range(min(n, samples.count(x))):
                # clone: a model may modify its input
                alone = samples.call(self.model, samples.map_leaves(torch.clone, samples.take(x, slice(i, i + 1))))
                ref = logits[i : i + 1].detach()
                tol = (1e-9 if ref.dtype == torch.float64 else 1e-4) * (float(ref.abs().max()) + 1.0)
                if not torch.isfinite(ref).all():
                    continue
                if alone.shape != ref.shape or float((alone - ref).abs().max()) > tol:
                    again = samples.call(self.model, samples.map_leaves(torch.clone, samples.take(x, slice(i, i + 1))))
                    if again.shape == alone.shape and float((again - alone).abs().max()) > tol:
                        raise DNTKError(random_forward_message(f"sample {i} run alone twice gave different logits"))
                    padded = (" or on its padding (its tokens are cut to its own length when it is run alone: mask the "
                              "padding in the model, or pad every sequence to one length with --max-length)"
                              if isinstance(x, samples.PaddedTokens) else "")
                    raise DNTKError(
                        f"the model's output for sample {i} depends on the rest of its batch{padded} (its logits differ "
                        "when it is run alone), so per-sample gradients of a batch are not defined; use batch_size=1, "
                        "or remove the cross-sample operation")

    def _note(self, names, path):
        for n in names:
            self.paths.setdefault(n, set()).add(path)

    def _plan(self, u: _Use, lays: list, B: int) -> dict:
        """Decide, once per batch, how each recorded call is differentiated per sample."""
        plan = self._plan_closed(u, lays, B)
        if plan["path"] == "op-vjp" and u.cut is None:
            u.cut = [_closed_form_call(u)]
        return plan

    def _plan_closed(self, u: _Use, lays: list, B: int) -> dict:
        lay = lays[0] if lays else None
        if u.kind == "generic" or (B > 1 and not isinstance(lay, Layout) and lay is not None):
            return {"path": "op-vjp", "layouts": lays}
        if B > 1 and lay is None:  # no gradient reached the call in this batch
            return {"path": "none"}
        o = u.outs[0]
        if u.kind == "linear":
            if lay is not None and lay.dim >= o.dim() - 1:
                return {"path": "op-vjp", "layouts": lays}
            xb = split_batch(u.data.pop("x"), lay, B)
            a = xb.reshape(B, -1, xb.shape[-1]).transpose(1, 2)
            fac = u.weight is not None and u.weight.param is not None
            return {"path": "linear", "layout": lay, "a": a.contiguous() if fac else a}
        if u.kind == "matmul":  # x [..., in] @ W [in, out]: the weight gradient is Σ_t x_t g_tᵀ
            if lay is not None and lay.dim >= o.dim() - 1:
                return {"path": "op-vjp", "layouts": lays}
            xb = split_batch(u.data.pop("x"), lay, B)
            a = xb.reshape(B, -1, xb.shape[-1]).transpose(1, 2)
            return {"path": "matmul", "layout": lay, "x_rows": a.contiguous()}
        if u.kind == "conv":
            if lay is not None and lay.dim != 0:
                return {"path": "op-vjp", "layouts": lays}
            a = u.data.pop("a")                                   # [N, cols, L]
            ab = split_batch(a, lay, B)                            # [B, r, cols, L]
            a = ab.transpose(1, 2).reshape(B, ab.shape[2], -1)     # [B, cols, r·L]
            fac = u.data["groups"] == 1 and u.weight is not None and u.weight.param is not None
            return {"path": "conv", "layout": lay, "a": a if fac else None, "a_mat": None if fac else a}
        if u.kind in ("batch_norm", "group_norm"):
            if lay is not None and lay.dim == u.data["channel"]:
                return {"path": "op-vjp", "layouts": lays}
            return {"path": u.kind, "layout": lay}
        if u.kind == "layer_norm":
            if lay is not None and lay.dim >= o.dim() - u.data["nd"]:
                return {"path": "op-vjp", "layouts": lays}
            return {"path": "layer_norm", "layout": lay}
        if u.kind == "embedding":
            if lay is not None and lay.dim >= o.dim() - 1:
                return {"path": "op-vjp", "layouts": lays}
            return {"path": "embedding", "layout": lay}
        return {"path": "op-vjp", "layouts": lays}

    def _emit(self, u, plan, g_u, B, g_fac, blocks):
        path = plan["path"]
        if path == "none":
            return
        if path == "op-vjp":
            self._op_vjp(u, plan["layouts"], g_u, B, blocks)
            return
        g = g_u[0] if g_u[0] is not None else torch.zeros_like(u.outs[0])
        lay = plan["layout"]
        gb = split_batch(g, lay, B)
        if path == "linear":
            gf = gb.reshape(B, -1, gb.shape[-1]).transpose(1, 2)          # [B, out, T]
            self._weight(u, gf, plan["a"], None, g_fac, blocks, B)
            self._bias(u, lambda: gf.sum(-1), blocks, B)
        elif path == "matmul":
            gf = gb.reshape(B, -1, gb.shape[-1]).transpose(1, 2)          # [B, out, T]
            src = u.weight
            if src.param is not None:   # rows of W are the input side: factors (x [B, in, T], g [B, out, T])
                g_fac.setdefault(("var", src.param), []).append((plan["x_rows"], gf))
                self._note([src.param], "factored")
            else:
                self._route(src, torch.bmm(plan["x_rows"], gf.transpose(1, 2)), blocks, "closed")
        elif path == "conv":
            gf = gb.transpose(1, 2).reshape(B, gb.shape[2], -1)             # [B, out, r·L]
            groups = u.data["groups"]
            if plan["a"] is not None:
                self._weight(u, gf, plan["a"], None, g_fac, blocks, B)
            elif u.weight is not None:
                a = plan["a_mat"]
                w = u.weight.tensor
                ga = gf.unflatten(1, (groups, -1))                            # [B, G, out_g, T]
                aa = a.unflatten(1, (groups, -1))                             # [B, G, cols_g, T]
                G = torch.einsum("bgot,bgit->bgoi", ga, aa).reshape(B, *w.shape)
                self._weight(u, None, None, G, g_fac, blocks, B)
            self._bias(u, lambda: gf.sum(-1), blocks, B)
        elif path in ("batch_norm", "group_norm"):
            ch = u.data["channel"] + 1
            keep = lambda t: t.sum([d for d in range(1, t.dim()) if d != ch])  # noqa: E731
            xh = split_batch(u.data["xhat"], lay, B)
            if u.weight is not None:
                self._weight(u, None, None, keep(gb * xh), g_fac, blocks, B)
            self._bias(u, lambda: keep(gb), blocks, B)
        elif path == "layer_norm":
            nd = u.data["nd"]
            xh = split_batch(u.data["xhat"], lay, B)
            red = lambda t: t.sum(list(range(1, t.dim() - nd))) if t.dim() - nd > 1 else t  # noqa: E731
            if u.weight is not None:
                self._weight(u, None, None, red(gb * xh), g_fac, blocks, B)
            self._bias(u, lambda: red(gb), blocks, B)
        elif path == "embedding":
            w = u.weight.tensor if u.weight is not None else None
            if w is None:
                return
            idx = split_batch(u.data["idx"], lay, B).reshape(B, -1)
            gg = gb.reshape(B, -1, gb.shape[-1])
            G = torch.zeros(B, w.shape[0], w.shape[1], dtype=gg.dtype, device=gg.device)
            G.scatter_add_(1, idx.unsqueeze(-1).expand(-1, -1, w.shape[1]), gg)
            if u.data["padding_idx"] is not None:
                G[:, u.data["padding_idx"]] = 0
            self._weight(u, None, None, G, g_fac, blocks, B)

    # -- helpers that route one per-sample gradient of a weight/bias slot --------------------------
    def _add_block(self, blocks, name, blk):
        blk = blk.reshape(blk.shape[0], -1)
        blocks[name] = blk if name not in blocks else blocks[name] + blk

    def _weight(self, u, gf, a, G, g_fac, blocks, B):
        src = u.weight
        if src is None:
            return
        if src.param is not None and gf is not None:
            g_fac.setdefault(src.param, []).append(gf)
            self._note([src.param], "factored")
            return
        if G is None:
            G = torch.bmm(gf, a.transpose(1, 2))
        self._route(src, G.reshape(B, *src.tensor.shape), blocks, "closed")

    def _bias(self, u, make, blocks, B):
        src = u.bias
        if src is None:
            return
        self._route(src, make().reshape(B, *src.tensor.shape), blocks, "closed")

    def _route(self, src, G, blocks, path):
        """A per-sample gradient G [B, *shape] of a weight slot: a parameter's block, or pulled back
        through the derivation of a derived tensor (batched vjp)."""
        if src.param is not None:
            self._add_block(blocks, src.param, G)
            self._note([src.param], path)
            return
        aliases = [self._aliases[n] for n in src.roots]
        res = _batched_vjp([src.tensor], aliases, [G])
        for n, r in zip(src.roots, res):
            if r is not None:
                self._add_block(blocks, n, r)
        self._note(src.roots, "derived")

    def _op_vjp(self, u, lays, g_u, B, blocks):
        aliases = [self._aliases[n] for n in u.roots]
        B_chunk = max(1, min(B, (256 << 20) // max(1, sum(o.numel() * o.element_size() for o in u.outs))))
        parts = {n: [] for n in u.roots}
        for s in range(0, B, B_chunk):
            bs = slice(s, min(B, s + B_chunk))
            cots = []
            for o, g, lay in zip(u.outs, g_u, lays):
                g = g if g is not None else torch.zeros_like(o)
                if B == 1:
                    cots.append(g.unsqueeze(0))
                elif isinstance(lay, Layout):
                    cots.append(_masked(g, lay, B, None, bs))
                elif lay is None:
                    cots.append(torch.zeros(bs.stop - bs.start, *o.shape, dtype=o.dtype, device=o.device))
                else:
                    cots.append(_masked(g, None, B, lay, bs))
            keep = [j for j, c in enumerate(u.cut) if c is not None]
            res = _batched_vjp([u.cut[j] for j in keep], aliases, [cots[j] for j in keep]) if keep else [None] * len(aliases)
            for n, r in zip(u.roots, res):
                if r is None:
                    r = torch.zeros(bs.stop - bs.start, *self._aliases[n].shape,
                                    dtype=cots[0].dtype, device=cots[0].device)
                parts[n].append(r)
        for n in u.roots:
            self._add_block(blocks, n, torch.cat(parts[n], 0))
        self._note(u.roots, "op-vjp")

    # -- generic torch.func backend ----------------------------------------------------------------
    def _run_func(self, x, classes, sink):
        try:
            return self._run_func_inner(x, classes, sink)
        except RuntimeError as e:
            if "randomness" in str(e):
                raise DNTKError(random_forward_message("vmap refused its random operation")) from e
            raise DNTKError(f"backend='func' (whole-model vmap(jacrev)) cannot run this model on inputs "
                            f"{samples.describe(x)} ({type(e).__name__}: {str(e)[:300]}); data-dependent control "
                            "flow (Hugging Face padding logic, recurrent layers) defeats vmap — use the default "
                            "backend") from e

    def _run_func_inner(self, x, classes, sink):
        from torch.func import functional_call, jacrev, vmap

        model, table = self.model, self.table
        B = samples.count(x)
        x = dict(x) if isinstance(x, dict) else x   # a plain pytree for vmap
        with analysis_mode(model):
            with torch.no_grad():
                rng = _rng_states(x)
                logits = check_logits(samples.call(model, x), B)
                if _rng_states(x) != rng:
                    raise DNTKError(random_forward_message("it drew random numbers from torch's generator during the pass"))
            classes_r = _resolve_classes(classes, logits.shape[1])
            params = {n: p.detach() for n, p in table.params.items()}
            idx = torch.tensor(classes_r, device=logits.device)

            def f(p, xi):
                xb = samples.map_leaves(lambda t: t.unsqueeze(0), xi)
                args, kwargs = ((xb,), {}) if isinstance(xb, torch.Tensor) else ((xb, {}) if isinstance(xb, tuple)
                                                                                 else ((), xb))
                out = samples.logits_of(functional_call(model, p, args, kwargs, strict=False))
                return out.squeeze(0).index_select(0, idx)

            jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)  # name -> [B, C', *shape]
        for ci in range(len(classes_r)):
            for spec in table.specs:
                sink.block(ci, spec.name, jac[spec.name][:, ci].reshape(B, -1))
                self._note([spec.name], "func")
        return logits.detach()


def _closed_form_call(u: _Use) -> torch.Tensor:
    """A recorded closed-form call recomputed from its stored (detached) data, so that its graph reaches
    the parameters through this call alone; used when the call's layout needs the op-vjp path."""
    w = u.weight.tensor if u.weight is not None else None
    b = u.bias.tensor if u.bias is not None else None
    o = u.outs[0]
    if u.kind == "linear":
        return F.linear(u.data["x"], w, b)
    if u.kind == "matmul":
        return torch.matmul(u.data["x"], w)
    if u.kind == "embedding":
        return F.embedding(u.data["idx"], w, u.data["padding_idx"])
    if u.kind == "conv":
        a, G = u.data["a"], u.data["groups"]                                  # [N, cols, L]
        N, cols, L = a.shape
        out = torch.einsum("goi,ngil->ngol", w.reshape(G, w.shape[0] // G, -1), a.view(N, G, cols // G, L))
        out = out.reshape(N, w.shape[0], *o.shape[2:])
        return out if b is None else out + b.view(1, -1, *([1] * (o.dim() - 2)))
    if u.kind in ("batch_norm", "group_norm"):
        xh = u.data["xhat"]
        shape = [1, -1] + [1] * (xh.dim() - 2)
        out = xh if w is None else xh * w.view(shape)
        return out if b is None else out + b.view(shape)
    if u.kind == "layer_norm":
        xh = u.data["xhat"]
        out = xh if w is None else xh * w
        return out if b is None else out + b
    raise AssertionError(u.kind)  # pragma: no cover


def _owner(uses, i):
    k = 0
    for u in uses:
        k += len(u.outs)
        if i < k:
            return u
    return uses[-1]


def _batched_vjp(outputs, inputs, cotangents):
    """Per-sample vjp: for each row of the cotangents [S, *out.shape], d<out, cot>/d inputs → [S, *in.shape]."""
    try:
        return torch.autograd.grad(outputs, inputs, cotangents, retain_graph=True, allow_unused=True,
                                   is_grads_batched=True)
    except RuntimeError:  # an op without a batching rule: one vjp per sample (same numbers, slower)
        S = cotangents[0].shape[0]
        rows = [torch.autograd.grad(outputs, inputs, [c[s] for c in cotangents], retain_graph=True, allow_unused=True)
                for s in range(S)]
        out = []
        for j, inp in enumerate(inputs):
            col = [r[j] for r in rows]
            out.append(None if all(c is None for c in col) else
                       torch.stack([c if c is not None else torch.zeros_like(inp) for c in col]))
        return out


def compiled_parts(model: nn.Module) -> list[str]:
    """Names of the model's (sub)modules that are compiled, scripted or traced — torch.jit.ScriptModule
    (torch.jit.script or torch.jit.trace) and torch.compile's OptimizedModule — whose calls the op-level
    recorder cannot see; [] for a plain eager model. (A torch.fx.GraphModule is not among them: its
    generated forward is eager Python whose calls the recorder sees, and the engine handles it exactly.)"""
    kinds = [torch.jit.ScriptModule]
    try:
        from torch._dynamo.eval_frame import OptimizedModule

        kinds.append(OptimizedModule)
    except Exception:   # pragma: no cover - torch builds without dynamo
        pass
    found = []
    for name, m in model.named_modules():
        if isinstance(m, tuple(kinds)):
            found.append(f"{'the model' if not name else name} ({type(m).__name__})")
    return found


def _rng_states(x) -> list:
    """The global torch generators a forward on x could draw from: the CPU one and that of every CUDA
    device holding an input (a forward that advances one of them sampled random numbers)."""
    states = [torch.random.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices = sorted({t.device.index or 0 for t in samples.leaves(x) if t.device.type == "cuda"})
        states += [torch.cuda.get_rng_state(d) for d in devices]
    return [bytes(s.numpy().tobytes()) for s in states]


def random_forward_message(evidence: str) -> str:
    return (f"the forward is random ({evidence}): dropout in training mode (e.g. F.dropout(x, training=True) — dntk "
            "puts the model in eval mode, which functional calls ignore) or random sampling (torch.randn_like, "
            "torch.rand, torch.bernoulli, ...); its per-sample gradients would be those of one random draw — call "
            "model.eval() and pass training=self.training to functional dropout, or remove the random sampling")


def _resolve_classes(classes, C: int) -> list[int]:
    from .. import validate as V

    if classes is None:
        return list(range(C))
    if isinstance(classes, (str, bytes)) or not hasattr(classes, "__iter__"):
        raise DNTKError(f"classes must be None or a list of logit indices 0..{C - 1}, got {classes!r}")
    out = []
    for c in classes:
        c = V.count(c.item() if isinstance(c, torch.Tensor) and c.dim() == 0 else c, "a class index",
                    f"pass logit indices 0..{C - 1}", minimum=0)
        if not 0 <= c < C:
            raise DNTKError(f"class index {c} is out of range for a model with C={C} outputs; use 0..{C - 1}")
        out.append(c)
    if not out:
        raise DNTKError("classes is empty; pass None for all logits or a non-empty list of indices")
    return out
