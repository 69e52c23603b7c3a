"""The exact empirical NTK, by blocks over inputs."""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import DNTKError
from .capture import GradientCapture
from .engine import model_device

BLOCKS = ("per_class", "full", "trace")


class _ExactSink:
    """Materialises per-sample gradient blocks: grads[c][name] -> [B, numel] (tied weights summed)."""

    def __init__(self):
        self.grads: dict[int, dict[str, torch.Tensor]] = {}

    def _add(self, c, name, block):
        d = self.grads.setdefault(c, {})
        if name in d:
            d[name] = d[name] + block
        else:
            d[name] = block

    def block(self, c, name, block):
        self._add(c, name, block.detach())

    def outer(self, c, name, g, a):
        self._add(c, name, torch.bmm(g, a.transpose(1, 2)).reshape(g.shape[0], -1))


def _gradients(capture, x, classes):
    """All per-sample gradient blocks of batch x: {name: [C', B, numel]}."""
    sink = _ExactSink()
    capture.run(x, classes, sink)
    cs = sorted(sink.grads)
    names = [s.name for s in capture.specs]
    out = {}
    for name in names:
        blocks = [sink.grads[c].get(name) for c in cs]
        ref = next((b for b in blocks if b is not None), None)
        if ref is None:
            continue
        out[name] = torch.stack([b if b is not None else torch.zeros_like(ref) for b in blocks])
    return out


def _contract(g1: dict, g2: dict, blocks: str) -> torch.Tensor:
    """Σ over parameter blocks of the inner products, float64.

    per_class -> [C, B1, B2]; full -> [B1, C, B2, C]; trace -> [B1, B2]."""
    total = None
    for name, a in g1.items():
        b = g2.get(name)
        if b is None:
            continue
        if blocks == "full":
            C, B1, P = a.shape
            B2 = b.shape[1]
            part = (a.reshape(C * B1, P) @ b.reshape(C * B2, P).T).double().reshape(C, B1, C, B2).permute(1, 0, 3, 2)
        else:
            part = torch.bmm(a, b.transpose(1, 2)).double()
            if blocks == "trace":
                part = part.sum(0)
        total = part if total is None else total + part
    return total


def empirical_ntk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None = None, *, blocks: str = "per_class",
                  batch_size: int | None = None, classes=None, backend: str = "auto",
                  memory_budget_bytes: int = 2 << 30) -> torch.Tensor:
    """Exact empirical NTK K[(i,a),(j,b)] = ⟨∇θ f_a(x1_i), ∇θ f_b(x2_j)⟩ (float64).

    Args:
        model: forward(x [B, ...]) -> logits [B, C]; evaluated in eval mode (BatchNorm running
            statistics), mode restored afterwards. Only parameters with requires_grad count;
            tied parameters count once.
        x1: inputs [n1, ...]; x2: inputs [n2, ...] or None for x2 = x1 (then only j ≥ i blocks
            are computed and mirrored).
        blocks: ``"per_class"`` → [C, n1, n2] with K[c, i, j] = ⟨∇f_c(x1_i), ∇f_c(x2_j)⟩;
            ``"full"`` → [n1, C, n2, C]; ``"trace"`` → [n1, n2], the sum over logits.
        batch_size: inputs per gradient pass; default keeps one pass's gradients B·C·P·4 bytes
            ≤ 256 MiB.
        classes: restrict to these logits (C then means len(classes)).
        memory_budget_bytes: if all of x2's gradients fit (n2·C·P·itemsize bytes), they are
            computed once and kept; otherwise they are recomputed for every x1 block.

    Peak memory ≈ 2·B·C·P·itemsize (one x1 block and one x2 block of gradients, or all of x2's
    gradients when they fit the budget) + one batch's activations + the [n1·C, n2·C] result.
    """
    if blocks not in BLOCKS:
        raise DNTKError(f"unknown blocks={blocks!r}; use one of {', '.join(BLOCKS)}")
    device = model_device(model)
    symmetric = x2 is None
    x2 = x1 if symmetric else x2
    for name, x in (("x1", x1), ("x2", x2)):
        if not isinstance(x, torch.Tensor):
            raise DNTKError(f"{name} must be a tensor [n, ...], got {type(x).__name__}")
        if x.shape[0] == 0:
            raise DNTKError(f"{name} is empty (0 samples); pass at least one input")
        if x.device != device:
            raise DNTKError(f"{name} is on {x.device} but the model is on {device}; move the inputs with .to('{device}')")
    capture = GradientCapture(model, backend=backend)
    P = capture.table.num_params
    with torch.no_grad():
        C = len(classes) if classes is not None else _num_outputs(model, x1[:1], capture)
    itemsize = next(iter(capture.table.params.values())).element_size()
    if batch_size is None:
        batch_size = max(1, min(64, (256 << 20) // max(1, C * P * itemsize)))
    n1, n2 = x1.shape[0], x2.shape[0]

    starts1 = list(range(0, n1, batch_size))
    starts2 = list(range(0, n2, batch_size))
    keep_x2 = n2 * C * P * itemsize <= memory_budget_bytes
    cached2: dict[int, dict] = {}

    def grads2(s):
        if s in cached2:
            return cached2[s]
        g = _gradients(capture, x2[s : s + batch_size], classes)
        if keep_x2:
            cached2[s] = g
        return g

    if blocks == "per_class":
        K = torch.zeros(C, n1, n2, dtype=torch.float64)
    elif blocks == "full":
        K = torch.zeros(n1, C, n2, C, dtype=torch.float64)
    else:
        K = torch.zeros(n1, n2, dtype=torch.float64)

    def put(s1, s2, block, mirror):
        if blocks == "per_class":
            _, b1, b2 = block.shape
            K[:, s1 : s1 + b1, s2 : s2 + b2] = block.cpu()
            if mirror:
                K[:, s2 : s2 + b2, s1 : s1 + b1] = block.transpose(1, 2).cpu()
        elif blocks == "full":
            b1, _, b2, _ = block.shape
            K[s1 : s1 + b1, :, s2 : s2 + b2, :] = block.cpu()
            if mirror:
                K[s2 : s2 + b2, :, s1 : s1 + b1, :] = block.permute(2, 3, 0, 1).cpu()
        else:
            b1, b2 = block.shape
            K[s1 : s1 + b1, s2 : s2 + b2] = block.cpu()
            if mirror:
                K[s2 : s2 + b2, s1 : s1 + b1] = block.T.cpu()

    for s1 in starts1:
        if symmetric:
            g1 = grads2(s1)
        else:
            g1 = _gradients(capture, x1[s1 : s1 + batch_size], classes)
        for s2 in starts2:
            if symmetric and s2 < s1:
                continue
            g2 = g1 if (symmetric and s2 == s1) else grads2(s2)
            put(s1, s2, _contract(g1, g2, blocks), mirror=symmetric and s2 != s1)
    return K


def _num_outputs(model, x, capture) -> int:
    from .capture import analysis_mode, check_logits

    with analysis_mode(model, capture.table, freeze=False):
        return check_logits(model(x), x.shape[0]).shape[1]
