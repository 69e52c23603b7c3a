"""Where the op rules hand their per-sample gradients during one logit's emission: the
:class:`Accumulator` (factored weight gradients, formed blocks, and the pull-back of a derived
tensor's block to its parameters by a batched vjp), and the generic ``op-vjp`` path, exact for any
recorded call."""

from __future__ import annotations

import torch

from ...projection.base import table_gradient
from .derivations import row_standardisation
from .layouts import Layout, masked


def batched_vjp(outputs, inputs, cotangents):
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


class Accumulator:
    """One logit's per-sample gradients of one batch: ``factors`` {param: [g [B, rows, T], ...]} of
    factored weight gradients (and {("var", param): [(x_rows, g), ...]} for ``x @ W``), ``blocks``
    {param: [B, numel]} of formed ones (a parameter's uses summed). ``note(names, path)`` records which
    public path each parameter took; ``aliases`` are the pass's parameter aliases (derived tensors are
    pulled back to them)."""

    def __init__(self, aliases: dict, note):
        self.aliases, self.note = aliases, note
        self.factors: dict = {}
        self.blocks: dict[str, torch.Tensor] = {}
        self.rowscaled: dict[str, list] = {}
        self.table_rows: dict[str, list] = {}

    def add_rows(self, name: str, idx: torch.Tensor, vals: torch.Tensor) -> None:
        """A per-sample table gradient Σ_t e_{idx[b, t]} vals[b, t]ᵀ of ``name`` (idx [B, T], vals [B, T, cols])."""
        self.table_rows.setdefault(name, []).append((idx, vals))

    def dense_rows(self, name: str, idx: torch.Tensor, vals: torch.Tensor) -> torch.Tensor:
        """The same gradient formed: [B, rows, cols] by a scatter-add."""
        return table_gradient(idx, vals, self.aliases[name].shape[0])

    def add_rowscaled(self, name: str, d: torch.Tensor, what: torch.Tensor) -> None:
        """A per-sample gradient diag(d_b) Ŵ of ``name``: d [B, rows] against a fixed Ŵ [rows, cols] (see
        :mod:`~dntk.features.capture.derivations`)."""
        self.rowscaled.setdefault(name, []).append((d, what))

    def add_block(self, name: str, blk: torch.Tensor) -> None:
        blk = blk.reshape(blk.shape[0], -1)
        self.blocks[name] = blk if name not in self.blocks else self.blocks[name] + blk

    def weight(self, use, gf=None, a=None, G=None) -> None:
        """The weight slot's per-sample gradient: factors gf [B, rows, T] (with a [B, cols, T], the
        plan's cached factor) when the weight is a parameter and gf is given, else the formed block
        G [B, *shape] (or bmm(gf, aᵀ))."""
        src = use.weight
        if src is None:
            return
        if src.param is not None and gf is not None:
            self.factors.setdefault(src.param, []).append(gf)
            self.note([src.param], "factored")
            return
        if G is None:
            G = torch.bmm(gf, a.transpose(1, 2))
        self.route(src, G.reshape(G.shape[0], *src.tensor.shape), "closed")

    def bias(self, use, make) -> None:
        """The bias slot's per-sample gradient, ``make()`` → [B, *shape] (called only when there is a bias)."""
        src = use.bias
        if src is None:
            return
        G = make()
        self.route(src, G.reshape(G.shape[0], *src.tensor.shape), "closed")

    def factored_rows(self, param: str, x_rows: torch.Tensor, gf: torch.Tensor) -> None:
        """``x @ W``'s gradient Σ_t x_t g_tᵀ as factors whose column side changes with the logit."""
        self.factors.setdefault(("var", param), []).append((x_rows, gf))
        self.note([param], "factored")

    def route(self, src, G: torch.Tensor, path: str) -> None:
        """A per-sample gradient G [B, *shape] of a weight slot: a parameter's block, or pulled back
        through the derivation of a derived tensor (batched vjp)."""
        if src.param is not None:
            self.add_block(src.param, G)
            self.note([src.param], path)
            return
        std = row_standardisation(src)
        if std is not None:   # a standardised weight: the pull-back in closed form (derivations.py)
            self.add_block(std.root, std.pull_back(G.reshape(G.shape[0], *std.what.shape)))
            self.note(src.roots, "closed")
            return
        res = batched_vjp([src.tensor], [self.aliases[n] for n in src.roots], [G])
        for n, r in zip(src.roots, res):
            if r is not None:
                self.add_block(n, r)
        self.note(src.roots, "derived")

    def op_vjp(self, use, lays: list, g_u, B: int) -> None:
        """The generic path: the call's own vjp (of ``use.cut``, its outputs recomputed on detached data)
        with the output gradient masked to one sample at a time, in chunks of ≤ 256 MiB of cotangents.
        Exact for any call; cost O(B · the call's backward)."""
        aliases = [self.aliases[n] for n in use.roots]
        B_chunk = max(1, min(B, (256 << 20) // max(1, sum(o.numel() * o.element_size() for o in use.outs))))
        parts = {n: [] for n in use.roots}
        for s in range(0, B, B_chunk):
            bs = slice(s, min(B, s + B_chunk))
            cots = []
            for o, g, lay in zip(use.outs, g_u, lays):
                g = g if g is not None else torch.zeros_like(o)
                if B == 1:
                    cots.append(g.unsqueeze(0))
                elif isinstance(lay, Layout):
                    cots.append(masked(g, lay, B, None, bs))
                elif lay is None:
                    cots.append(torch.zeros(bs.stop - bs.start, *o.shape, dtype=o.dtype, device=o.device))
                else:
                    cots.append(masked(g, None, B, lay, bs))
            keep = [j for j, c in enumerate(use.cut) if c is not None]
            res = batched_vjp([use.cut[j] for j in keep], aliases, [cots[j] for j in keep]) if keep else [None] * len(aliases)
            for n, r in zip(use.roots, res):
                if r is None:
                    r = torch.zeros(bs.stop - bs.start, *self.aliases[n].shape,
                                    dtype=cots[0].dtype, device=cots[0].device)
                parts[n].append(r)
        for n in use.roots:
            self.add_block(n, torch.cat(parts[n], 0))
        self.note(use.roots, "op-vjp")
