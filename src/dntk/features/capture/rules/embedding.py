"""``F.embedding``: the per-sample table gradient as a scatter-add of the output gradient.

Exactness. y_t = W[i_t], so ∂(g·y)/∂W is Σ_t g_t added into row i_t (``scatter_add_`` of the sample's
output-gradient rows by its indices), with the padding row zeroed as autograd does for
``padding_idx``. ``max_norm`` renormalises W in place and is left to op-vjp; ``scale_grad_by_freq``
scales by counts over the whole batch, which couples the samples, and is refused. Cost: the
B·T·dim output-gradient rows handed to the sink with their indices (a sketch adds them to its buckets,
O(B·T·dim); a sink that needs the block forms it, O(B·numel)); a derived table is formed and pulled back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ....errors import DNTKError
from ....projection.base import table_gradient
from ..layouts import split_batch
from .base import NotHandled, OpRule, arg, register


@dataclass
class EmbeddingData:
    idx: torch.Tensor           # the indices, detached
    padding_idx: int | None     # made non-negative


class EmbeddingRule(OpRule):
    kind = "embedding"
    functions = (F.embedding,)

    def record(self, rec, use, func, args, kwargs, out):
        idx, w = arg(args, kwargs, 0, "input"), arg(args, kwargs, 1, "weight")
        padding_idx, max_norm = arg(args, kwargs, 2, "padding_idx"), arg(args, kwargs, 3, "max_norm")
        if arg(args, kwargs, 5, "scale_grad_by_freq", False):
            raise DNTKError("an embedding with scale_grad_by_freq=True scales its gradient by how often each index "
                            "occurs in the whole batch, which couples the samples; per-sample gradients are not "
                            "defined — build it with scale_grad_by_freq=False")
        if max_norm is not None or rec.roots_of(idx) is not None:
            raise NotHandled
        use.weight = rec.source(w)
        if padding_idx is not None and padding_idx < 0:
            padding_idx += w.shape[0]
        use.data = EmbeddingData(idx.detach().clone(), padding_idx)

    def plan(self, use, lay, B):
        if lay is not None and lay.dim >= use.outs[0].dim() - 1:
            return None
        return {"layout": lay}

    def emit(self, use, plan, gb, B, acc):
        w = use.weight.tensor if use.weight is not None else None
        if w is None:
            return
        idx = split_batch(use.data.idx, plan["layout"], B).reshape(B, -1)
        gg = gb.reshape(B, -1, gb.shape[-1])
        if use.weight.param is not None:   # the table's rows straight to the sink (a sketch adds them to its buckets)
            if use.data.padding_idx is not None:
                gg = gg * (idx != use.data.padding_idx).unsqueeze(-1).to(gg.dtype)
            acc.add_rows(use.weight.param, idx, gg)
            acc.note([use.weight.param], "closed")
            return
        G = table_gradient(idx, gg, w.shape[0])
        if use.data.padding_idx is not None:
            G[:, use.data.padding_idx] = 0
        acc.weight(use, G=G)

    def recompute(self, use):
        return F.embedding(use.data.idx, use.weight.tensor, use.data.padding_idx)


register(EmbeddingRule())
