"""The exact empirical NTK, by blocks over inputs."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from .. import samples
from ..errors import DNTKError, require_int
from .capture import GradientCapture
from ..validate import real_model
from .extract import as_inputs, model_device, refuse_nonfinite

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

    def outer(self, c, name, g, a, fixed_a=True):
        self._add(c, name, torch.bmm(g, a.transpose(1, 2)).reshape(g.shape[0], -1))


def _run_finite(capture, x, classes, sink, start: int):
    """Run the capture of batch x into sink (whose ``grads`` is {class: {name: [B, ...]}}) and return the
    sink; a sample (global index start + position) with a non-finite logit or gradient is refused, as in
    gradient_features."""
    logits = capture.run(x, classes, sink)
    bad = ~torch.isfinite(logits).all(dim=1)
    for d in sink.grads.values():
        for b in d.values():
            bad = bad | ~torch.isfinite(b).all(dim=1)
    refuse_nonfinite(bad, start)
    return sink


def _gradients(capture, x, classes, start: int = 0):
    """All per-sample gradient blocks of batch x: {name: [C', B, numel]}; a sample (global index start +
    position) with a non-finite logit or gradient is refused, as in gradient_features."""
    sink = _run_finite(capture, x, classes, _ExactSink(), start)
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


class _BlockStore:
    """x2's gradient blocks, each computed once: kept in memory while the running total stays within
    ``budget`` bytes, the rest written to a private temporary folder (one ``torch.save`` file per
    block, on the CPU) and read back on every use. ``close()`` deletes the folder and its files."""

    def __init__(self, budget: int, spill_dir, device):
        self.budget, self.parent, self.device = budget, spill_dir, device
        self.kept: dict[int, dict] = {}
        self.files: dict[int, Path] = {}
        self.kept_bytes = 0
        self.spilled_bytes = 0
        self.folder: Path | None = None

    def put(self, key: int, grads: dict, nbytes: int) -> None:
        if self.kept_bytes + nbytes <= self.budget:
            self.kept[key] = grads
            self.kept_bytes += nbytes
            return
        if self.folder is None:
            self.folder = Path(tempfile.mkdtemp(prefix="dntk-ntk-spill-", dir=self.parent))
        path = self.folder / f"x2-block-{key:09d}.pt"
        torch.save({name: t.cpu() for name, t in grads.items()}, path)
        self.files[key] = path
        self.spilled_bytes += nbytes

    def get(self, key: int) -> dict:
        if key in self.kept:
            return self.kept[key]
        return torch.load(self.files[key], map_location=self.device, weights_only=True)

    def close(self) -> None:
        self.kept.clear()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder = None
        self.files.clear()


def empirical_ntk(model: nn.Module, x1: torch.Tensor, x2: torch.Tensor | None = None, *, blocks: str = "per_class",
                  batch_size: int | None = None, classes=None, backend: str = "auto",
                  memory_budget_bytes: int = 2 << 30, spill_dir: str | os.PathLike | None = None) -> torch.Tensor:
    """Exact empirical NTK K[(i,a),(j,b)] = ⟨∇θ f_a(x1_i), ∇θ f_b(x2_j)⟩ (float64).

    Args:
        model: forward(x [B, ...]) -> logits [B, C]; evaluated in eval mode (BatchNorm running
            statistics), mode restored afterwards. Only parameters with requires_grad count;
            tied parameters count once.
        x1: inputs [n1, ...]; x2: inputs [n2, ...] or None for x2 = x1 (then only j ≥ i blocks
            are computed and mirrored). Each a tensor, or a tuple/dict of tensors with the sample
            axis first (:mod:`dntk.samples`).
        blocks: ``"per_class"`` → [C, n1, n2] with K[c, i, j] = ⟨∇f_c(x1_i), ∇f_c(x2_j)⟩;
            ``"full"`` → [n1, C, n2, C]; ``"trace"`` → [n1, n2], the sum over logits.
        batch_size: inputs per gradient pass (≥ 1); default keeps one pass's gradients
            B·C·P·itemsize ≤ 256 MiB.
        classes: restrict to these logits (C then means len(classes)).
        memory_budget_bytes: bytes of x2's gradients kept in memory (≥ 0). x2's gradients are
            computed once, block by block; blocks are kept in memory while the running total stays
            within the budget, and the rest are spilled to disk (see ``spill_dir``).
        spill_dir: folder in which a private temporary folder for the spilled blocks is made
            (default: the system's temporary directory, ``tempfile.gettempdir()``). The folder and
            every file in it are deleted before returning, also on error.

    Cost, with B = batch_size, G = C·P·itemsize bytes of gradients per input:
        gradient passes: ⌈n2/B⌉ + ⌈n1/B⌉ (x2's blocks once, then each x1 block once), or ⌈n/B⌉
            when x2 is None — never a recomputation, whatever the budget.
        disk: max(0, n2·G − memory_budget_bytes) bytes written once (rounded up to whole blocks)
            and read back ⌈n1/B⌉ times (symmetric case: about half of that, j ≥ i only); the free
            space is checked before the first gradient pass and too little of it is an error.
        peak memory ≈ min(n2·G, memory_budget_bytes) + 2·B·G (one x1 and one x2 block) + one
            batch's activations + the [n1·C, n2·C] result.
    Spilling trades gradient passes for disk reads: the Jacobian of one ResNet-18 input with 10
    logits is 448 MB in float32, so 500 spilled inputs take 224 GB of disk.
    """
    if blocks not in BLOCKS:
        raise DNTKError(f"unknown blocks={blocks!r}; use one of {', '.join(BLOCKS)}")
    require_int(memory_budget_bytes, "memory_budget_bytes", 0,
               "pass the number of bytes of x2's gradients to keep in memory (0 spills them all to disk)")
    if batch_size is not None:
        require_int(batch_size, "batch_size", 1, "pass a positive number of inputs per gradient pass, or None for the default")
    if spill_dir is not None and not Path(spill_dir).is_dir():
        raise DNTKError(f"spill_dir {str(spill_dir)!r} is not an existing folder; create it or pass None for the "
                        f"system's temporary directory")
    real_model(model, where="empirical_ntk")
    x1, x2 = as_inputs(x1), as_inputs(x2)
    device = model_device(model)
    symmetric = x2 is None
    x2 = x1 if symmetric else x2
    for name, x in (("x1", x1), ("x2", x2)):
        _check_inputs(x, name, device)
    capture = GradientCapture(model, backend=backend)
    P = capture.table.num_params
    with torch.no_grad():
        C = len(classes) if classes is not None else _num_outputs(model, samples.take(x1, slice(0, 1)), capture)
    itemsize = next(iter(capture.table.params.values())).element_size()
    if batch_size is None:
        batch_size = max(1, min(64, (256 << 20) // max(1, C * P * itemsize)))
    n1, n2 = samples.count(x1), samples.count(x2)

    starts1 = list(range(0, n1, batch_size))
    starts2 = list(range(0, n2, batch_size))
    per_input = C * P * itemsize
    _check_spill_space(starts2, n2, batch_size, per_input, memory_budget_bytes, spill_dir)

    if blocks == "per_class":
        K = torch.zeros(C, n1, n2, dtype=torch.float64)
    elif blocks == "full":
        K = torch.zeros(n1, C, n2, C, dtype=torch.float64)
    else:
        K = torch.zeros(n1, n2, dtype=torch.float64)

    def put(s1, s2, block, mirror):
        if block is None:  # no parameter's gradient reaches the logits here: the block stays zero
            return
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

    store = _BlockStore(memory_budget_bytes, spill_dir, device)
    try:
        for s2 in starts2:  # every x2 block's gradients exactly once
            xb = samples.take(x2, slice(s2, s2 + batch_size))
            store.put(s2, _gradients(capture, xb, classes, s2), samples.count(xb) * per_input)
        for s1 in starts1:
            g1 = store.get(s1) if symmetric else _gradients(capture, samples.take(x1, slice(s1, s1 + batch_size)),
                                                            classes, s1)
            for s2 in starts2:
                if symmetric and s2 < s1:
                    continue
                g2 = g1 if (symmetric and s2 == s1) else store.get(s2)
                put(s1, s2, _contract(g1, g2, blocks), mirror=symmetric and s2 != s1)
    finally:
        store.close()
    return K


def _check_spill_space(starts2, n2, batch_size, per_input, budget, spill_dir) -> None:
    """Refuse before any gradient pass when the blocks that exceed the budget cannot fit on disk."""
    kept, spill = 0, 0
    for s in starts2:
        nbytes = min(batch_size, n2 - s) * per_input
        if kept + nbytes <= budget:
            kept += nbytes
        else:
            spill += nbytes
    if spill == 0:
        return
    folder = spill_dir if spill_dir is not None else tempfile.gettempdir()
    free = shutil.disk_usage(folder).free
    if spill > free:
        raise DNTKError(f"x2's gradients need {spill / 2**30:.2f} GiB of disk beyond memory_budget_bytes="
                        f"{budget:,}, but {folder} has only {free / 2**30:.2f} GiB free; pass spill_dir= a folder on a "
                        f"larger disk, raise memory_budget_bytes, or use fewer x2 inputs or classes")


def _check_inputs(x, name: str, device) -> None:
    """x is a non-empty sample batch (tensor, tuple or dict of tensors, :mod:`dntk.samples`) on ``device``."""
    if not samples.is_batch(x):
        raise DNTKError(f"{name} must be a tensor [n, ...] or a tuple/dict of tensors [n, ...], got {type(x).__name__}")
    if samples.count(x, name) == 0:
        raise DNTKError(f"{name} is empty (0 samples); pass at least one input")
    for t in samples.leaves(x):
        if t.device != device:
            raise DNTKError(f"{name} is on {t.device} but the model is on {device}; move the inputs with .to('{device}')")


def _num_outputs(model, x, capture) -> int:
    """C from one traced pass (not a bare forward: a model that caches a derived weight on its first
    call must make that call under the recorder, or the cache would hide the weight's gradient)."""

    class _Null:
        def block(self, *a):
            pass

        def outer(self, *a, **k):
            pass

    return capture.run(x, [0], _Null()).shape[1]
