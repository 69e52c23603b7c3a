"""``conv1d`` / ``conv2d``: the unfolded input as the weight gradient's factor.

Exactness. A convolution is a linear map of the unfolded input patches a [N, cols, L]
(``F.unfold`` with the call's kernel, stride, dilation and padding; asymmetric "same" padding padded
explicitly first): y[:, :, l] = W a[:, :, l] (+ b). So ∂(g·y)/∂W = Σ_l g_l a_lᵀ per sample, handed to
the projector as factors when groups = 1 and W is a parameter (``factored``); grouped and depthwise
convs form the per-group block by an einsum over (out_g, cols_g) (``closed``); a weight-standardised
weight (checked, :mod:`~dntk.features.capture.derivations`) stays factored, [g/σ, −r/n] against [a, 1]
plus a row-scaled Ŵ (``closed``); any other derived weight pulls the formed block back (``derived``). Cost: the unfold (cols·L per
sample) plus the contraction; a layout with the samples anywhere but dim 0 falls back to op-vjp.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..derivations import row_standardisation
from ..layouts import split_batch
from .base import NotHandled, OpRule, arg, register


@dataclass
class ConvData:
    a: torch.Tensor | None      # unfolded input [N, cols, L]
    groups: int


def _tup(v, n):
    if isinstance(v, (tuple, list)):
        return tuple(int(u) for u in v)
    return (int(v),) * n


class ConvRule(OpRule):
    kind = "conv"
    functions = (torch.conv1d, torch.conv2d, F.conv1d, F.conv2d)
    _ND = {torch.conv1d: 1, torch.conv2d: 2, F.conv1d: 1, F.conv2d: 2}

    def record(self, rec, use, func, args, kwargs, out):
        nd = self._ND[func]
        x, w, b = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "weight"), arg(args, kwargs, 2, "bias")
        if rec.roots_of(x) is not None or x.dim() != nd + 2 or not isinstance(out, torch.Tensor):
            raise NotHandled
        stride, padding = arg(args, kwargs, 3, "stride", 1), arg(args, kwargs, 4, "padding", 0)
        dilation, groups = arg(args, kwargs, 5, "dilation", 1), arg(args, kwargs, 6, "groups", 1)
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
                raise NotHandled
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
        use.weight, use.bias = rec.source(w), rec.source(b)
        use.data = ConvData(F.unfold(xx, kernel, dilation=dilation, padding=sym, stride=stride), int(groups))

    def plan(self, use, lay, B):
        if lay is not None and lay.dim != 0:
            return None
        ab = split_batch(use.data.a, lay, B)                       # [B, r, cols, L]
        use.data.a = None
        a = ab.transpose(1, 2).reshape(B, ab.shape[2], -1)         # [B, cols, r·L]
        fac = use.data.groups == 1 and use.weight is not None and use.weight.param is not None
        std = (row_standardisation(use.weight) if use.data.groups == 1 and use.weight is not None and not fac
               else None)
        if std is not None:   # a standardised weight: factors [a, 1] and a row-scaled Ŵ (derivations.py)
            ones = torch.ones(B, a.shape[1], 1, dtype=a.dtype, device=a.device)
            z = torch.matmul(std.what.to(a.dtype), a)                # Ŵ a_t [B, out, T]
            return {"layout": lay, "a": torch.cat([a, ones], -1), "a_param": std.root, "std": std, "z": z,
                    "a_sum": a.sum(1, keepdim=True)}                 # Σ_j a_t[j] [B, 1, T]
        return {"layout": lay, "a": a if fac else None, "a_mat": None if fac else a}

    def emit(self, use, plan, gb, B, acc):
        gf = gb.transpose(1, 2).reshape(B, gb.shape[2], -1)             # [B, out, r·L]
        groups = use.data.groups
        if plan.get("std") is not None:
            std = plan["std"]
            gs = gf * std.inv_sigma.to(gf.dtype)[None, :, None]
            r = (gs * plan["a_sum"]).sum(-1, keepdim=True)              # [B, out, 1]
            acc.factors.setdefault(std.root, []).append(torch.cat([gs, r.div_(-std.n)], -1))
            acc.add_rowscaled(std.root, (gs * plan["z"]).sum(-1).div_(-std.n), std.what)
            acc.note([std.root], "closed")
        elif plan["a"] is not None:
            acc.weight(use, gf=gf, a=plan["a"])
        elif use.weight is not None:
            a = plan["a_mat"]
            w = use.weight.tensor
            ga = gf.unflatten(1, (groups, -1))                            # [B, G, out_g, T]
            aa = a.unflatten(1, (groups, -1))                             # [B, G, cols_g, T]
            acc.weight(use, G=torch.einsum("bgot,bgit->bgoi", ga, aa).reshape(B, *w.shape))
        acc.bias(use, lambda: gf.sum(-1))

    def recompute(self, use):
        w = use.weight.tensor if use.weight is not None else None
        b = use.bias.tensor if use.bias is not None else None
        o = use.outs[0]
        a, G = use.data.a, use.data.groups                                  # [N, cols, L]
        N, cols, L = a.shape
        out = torch.einsum("goi,ngil->ngol", w.reshape(G, w.shape[0] // G, -1), a.view(N, G, cols // G, L))
        out = out.reshape(N, w.shape[0], *o.shape[2:])
        return out if b is None else out + b.view(1, -1, *([1] * (o.dim() - 2)))


register(ConvRule())
