"""``F.multi_head_attention_forward`` (``nn.MultiheadAttention``) rewritten as two recorded linear calls
around scaled dot-product attention, so its in- and out-projections take the linear rule's factored
path instead of op-vjp.

Exactness: for the standard configuration the rewrite computes the same function as PyTorch's
(packed in-projection, then SDPA per head, then the out-projection), so its gradients are the
call's; any other configuration (masks, bias_k/bias_v, separate projection weights, attention weights
returned, training-mode dropout) declines and the call is recorded whole (op-vjp). Cost: two linear
calls' factors plus the attention core's forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import register_rewrite


def multi_head_attention(rec, args, kwargs):
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
             and rec.roots_of(q) is None and a["in_proj_weight"] is not None)
    if not plain:
        return None
    T, Bq, E = q.shape
    H = int(a["num_heads"])
    if E % H or a["in_proj_weight"].shape != (3 * E, E):
        return None
    hd = E // H

    def linear(x, w, b):
        roots = tuple(n for t in (w, b) if isinstance(t, torch.Tensor) for n in (rec.roots_of(t) or ()))
        return rec.consume(F.linear, (x, w, b), {}, roots)

    proj = linear(q, a["in_proj_weight"], a["in_proj_bias"])                    # [T, B, 3E]
    qkv = proj.unflatten(-1, (3, H, hd)).permute(2, 1, 3, 0, 4)                 # [3, B, H, T, hd]
    att = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])                # [B, H, T, hd]
    att = att.permute(2, 0, 1, 3).reshape(T, Bq, E)
    out = linear(att, a["out_proj_weight"], a["out_proj_bias"])                 # [T, B, E]
    return out, None


register_rewrite(F.multi_head_attention_forward, multi_head_attention)
