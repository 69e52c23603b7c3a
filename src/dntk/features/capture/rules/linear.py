"""``F.linear``, ``x @ W`` and ``torch.addmm(b, x, W)``: the weight gradient as factors, never formed.

Exactness. For y_t = W a_t (+ b) over the positions t of one sample, ∂(g·y)/∂W = Σ_t g_t a_tᵀ and
∂/∂b = Σ_t g_t — the chain rule, with g the output gradient of that sample (split by the measured
layout). The projector receives (g [B, out, T], a [B, in, T]) and contracts them without building the
[out, in] block (``factored``); a derived weight gets the formed block pulled back (``derived``).
Cost: O(B·T·(in + out)) per logit plus the projector's contraction; a layout whose sample dim is the
feature dim cannot be split this way (op-vjp).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..layouts import split_batch
from .base import NotHandled, OpRule, arg, register


@dataclass
class LinearData:
    x: torch.Tensor | None      # the call's input, detached [..., in]


def _rows(x, lay, B):
    xb = split_batch(x, lay, B)
    return xb.reshape(B, -1, xb.shape[-1]).transpose(1, 2)          # [B, in, T]


def _g_rows(gb, B):
    return gb.reshape(B, -1, gb.shape[-1]).transpose(1, 2)          # [B, out, T]


class LinearRule(OpRule):
    kind = "linear"
    functions = (F.linear, torch._C._nn.linear)

    def record(self, rec, use, func, args, kwargs, out):
        x, w, b = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
        if rec.roots_of(x) is not None or not isinstance(out, torch.Tensor) or x.dim() < 2:
            raise NotHandled
        use.weight, use.bias = rec.source(w), rec.source(b)
        use.data = LinearData(x.detach().clone())

    def plan(self, use, lay, B):
        if lay is not None and lay.dim >= use.outs[0].dim() - 1:
            return None
        a = _rows(use.data.x, lay, B)
        use.data.x = None   # the factor holds it from here on
        fac = use.weight is not None and use.weight.param is not None
        return {"layout": lay, "a": a.contiguous() if fac else a}

    def emit(self, use, plan, gb, B, acc):
        gf = _g_rows(gb, B)
        acc.weight(use, gf=gf, a=plan["a"])
        acc.bias(use, lambda: gf.sum(-1))

    def recompute(self, use):
        w = use.weight.tensor if use.weight is not None else None
        b = use.bias.tensor if use.bias is not None else None
        return F.linear(use.data.x, w, b)


class MatmulRule(OpRule):
    """``x [..., in] @ W [in, out]`` with a parameter W: the weight gradient is Σ_t x_t g_tᵀ, factored
    with the rows on the input side (the column factor changes with the logit, so no a-side cache)."""

    kind = "matmul"
    functions = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__)

    def record(self, rec, use, func, args, kwargs, out):
        x, w = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "other")
        if (rec.roots_of(x) is not None or not isinstance(w, torch.Tensor) or w.dim() != 2 or x.dim() < 2
                or rec.roots_of(w) is None or not isinstance(out, torch.Tensor)):
            raise NotHandled
        use.weight = rec.source(w)
        use.data = LinearData(x.detach().clone())

    def plan(self, use, lay, B):
        if lay is not None and lay.dim >= use.outs[0].dim() - 1:
            return None
        x_rows = _rows(use.data.x, lay, B).contiguous()
        use.data.x = None
        return {"layout": lay, "x_rows": x_rows}

    def emit(self, use, plan, gb, B, acc):
        gf = _g_rows(gb, B)
        src = use.weight
        if src.param is not None:   # rows of W are the input side: factors (x [B, in, T], g [B, out, T])
            acc.factored_rows(src.param, plan["x_rows"], gf)
        else:
            acc.route(src, torch.bmm(plan["x_rows"], gf.transpose(1, 2)), "closed")

    def recompute(self, use):
        return torch.matmul(use.data.x, use.weight.tensor)


class AddmmRule(MatmulRule):
    """``torch.addmm(b, x [N, in], W [in, out])`` = x @ W + b with parameters W and b (Hugging Face's
    ``Conv1D``, GPT-2's projections): the matmul rule's factors for W, Σ_t g_t for b. Only β = α = 1 and a
    data x; anything else is recorded whole (op-vjp)."""

    kind = "addmm"
    functions = (torch.addmm,)

    def record(self, rec, use, func, args, kwargs, out):
        b, x, w = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "mat1"), arg(args, kwargs, 2, "mat2")
        if (kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1 or len(args) > 3
                or not isinstance(x, torch.Tensor) or rec.roots_of(x) is not None or x.dim() != 2
                or not isinstance(w, torch.Tensor) or rec.roots_of(w) is None
                or not isinstance(b, torch.Tensor) or rec.roots_of(b) is None or b.dim() != 1
                or not isinstance(out, torch.Tensor)):
            raise NotHandled
        use.weight, use.bias = rec.source(w), rec.source(b)
        use.data = LinearData(x.detach().clone())

    def emit(self, use, plan, gb, B, acc):
        super().emit(use, plan, gb, B, acc)
        acc.bias(use, lambda: _g_rows(gb, B).sum(-1))

    def recompute(self, use):
        return torch.addmm(use.bias.tensor, use.data.x, use.weight.tensor)


register(LinearRule())
register(MatmulRule())
register(AddmmRule())
