"""Normalisation affines — batch norm (running statistics), group norm, layer norm, RMS norm — in
closed form from the normalised input.

Exactness. Each call is y = x̂ ⊙ w (+ b) with x̂ the normalised input, which does not depend on w or b
(running statistics in batch norm; per-sample, per-group/row statistics in group/layer/RMS norm —
the normalisation itself carries no parameter). So per sample ∂(g·y)/∂w = Σ g ⊙ x̂ and ∂/∂b = Σ g,
summed over every axis but the affine's (``closed``; a derived affine is pulled back, ``derived``).
x̂ is recomputed from the detached input with the call's own function and eps, so it is the value the
call used. Cost: O(B·numel of the output) per logit. Batch norm with batch statistics couples the
samples and is refused; a layout with the samples on the affine's axes falls back to op-vjp.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ....errors import DNTKError
from ..layouts import split_batch
from .base import NotHandled, OpRule, arg, register


@dataclass
class ChannelNormData:
    xhat: torch.Tensor          # the normalised input, [N, C, ...]
    channel: int = 1            # the affine's axis


@dataclass
class TrailingNormData:
    xhat: torch.Tensor          # the normalised input, [..., *normalized_shape]
    nd: int                     # len(normalized_shape): the affine spans the last nd axes


class _AffineNorm(OpRule):
    """y = x̂ ⊙ w (+ b): emit and recompute shared by every norm; a family says which axes of a per-sample
    gradient [B, ...] are summed (``reduce``) and how the affine broadcasts against x̂ (``view``)."""

    def reduce(self, use, t):
        raise NotImplementedError

    def view(self, use, p, xh):
        raise NotImplementedError

    def emit(self, use, plan, gb, B, acc):
        xh = split_batch(use.data.xhat, plan["layout"], B)
        if use.weight is not None:
            acc.weight(use, G=self.reduce(use, gb * xh))
        acc.bias(use, lambda: self.reduce(use, gb))

    def recompute(self, use):
        xh = use.data.xhat
        out = xh if use.weight is None else xh * self.view(use, use.weight.tensor, xh)
        return out if use.bias is None else out + self.view(use, use.bias.tensor, xh)


class _ChannelNorm(_AffineNorm):
    """The norms whose affine is per channel (axis 1)."""

    def plan(self, use, lay, B):
        if lay is not None and lay.dim == use.data.channel:
            return None
        return {"layout": lay}

    def reduce(self, use, t):
        ch = use.data.channel + 1
        return t.sum([d for d in range(1, t.dim()) if d != ch])

    def view(self, use, p, xh):
        return p.view([1, -1] + [1] * (xh.dim() - 2))


class BatchNormRule(_ChannelNorm):
    kind = "batch_norm"
    functions = (F.batch_norm,)

    def record(self, rec, use, func, args, kwargs, out):
        x, rm, rv = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "running_mean"), arg(args, kwargs, 2, "running_var")
        w, b = arg(args, kwargs, 3, "weight"), arg(args, kwargs, 4, "bias")
        training, eps = arg(args, kwargs, 5, "training", False), arg(args, kwargs, 7, "eps", 1e-5)
        if training or rm is None or rv is None:
            raise DNTKError("a batch_norm call uses the statistics of the batch (training=True or no running "
                            "statistics), so each sample's output depends on the rest of its batch and per-sample "
                            "gradients are not defined; use running statistics (eval mode, track_running_stats=True)")
        if rec.roots_of(x) is not None or x.dim() < 2:
            raise NotHandled
        shape = [1, -1] + [1] * (x.dim() - 2)
        xhat = (x.detach() - rm.detach().view(shape)) * torch.rsqrt(rv.detach().view(shape) + eps)
        use.weight, use.bias = rec.source(w), rec.source(b)
        use.data = ChannelNormData(xhat)


class GroupNormRule(_ChannelNorm):
    kind = "group_norm"
    functions = (F.group_norm,)

    def record(self, rec, use, func, args, kwargs, out):
        x, G = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "num_groups")
        w, b, eps = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias"), arg(args, kwargs, 4, "eps", 1e-5)
        if rec.roots_of(x) is not None or x.dim() < 2:
            raise NotHandled
        use.weight, use.bias = rec.source(w), rec.source(b)
        use.data = ChannelNormData(F.group_norm(x.detach(), G, None, None, eps))


class _TrailingNorm(_AffineNorm):
    """The norms whose affine spans the last nd axes."""

    def plan(self, use, lay, B):
        if lay is not None and lay.dim >= use.outs[0].dim() - use.data.nd:
            return None
        return {"layout": lay}

    def reduce(self, use, t):
        nd = use.data.nd
        return t.sum(list(range(1, t.dim() - nd))) if t.dim() - nd > 1 else t

    def view(self, use, p, xh):
        return p


def _normalized_shape(shape):
    return tuple(shape) if not isinstance(shape, int) else (shape,)


class LayerNormRule(_TrailingNorm):
    kind = "layer_norm"
    functions = (F.layer_norm,)

    def record(self, rec, use, func, args, kwargs, out):
        x, shape = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "normalized_shape")
        w, b, eps = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "bias"), arg(args, kwargs, 4, "eps", 1e-5)
        if rec.roots_of(x) is not None:
            raise NotHandled
        shape = _normalized_shape(shape)
        use.weight, use.bias = rec.source(w), rec.source(b)
        use.data = TrailingNormData(F.layer_norm(x.detach(), shape, None, None, eps), len(shape))


class RMSNormRule(_TrailingNorm):
    """``F.rms_norm`` (LLaMA-style RMSNorm, ``nn.RMSNorm``): y = x / rms(x) ⊙ w, no bias — the layer
    norm's closed form with x̂ = ``F.rms_norm(x, shape, None, eps)`` (the worked example of
    docs/extending.md)."""

    kind = "rms_norm"
    functions = (F.rms_norm,)

    def record(self, rec, use, func, args, kwargs, out):
        x, shape = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "normalized_shape")
        w, eps = arg(args, kwargs, 2, "weight"), arg(args, kwargs, 3, "eps")
        if rec.roots_of(x) is not None or not isinstance(out, torch.Tensor):
            raise NotHandled
        shape = _normalized_shape(shape)
        use.weight = rec.source(w)
        use.data = TrailingNormData(F.rms_norm(x.detach(), shape, None, eps), len(shape))


for _rule in (BatchNormRule(), GroupNormRule(), LayerNormRule(), RMSNormRule()):
    register(_rule)
