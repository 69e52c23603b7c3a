"""Projected per-logit gradient features φ_c(x) = Sᵀ ∇θ f_c(x)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from tqdm.auto import tqdm

from .. import samples
from .. import validate as V
from ..validate import real_model
from ..errors import DNTKError, require_int
from ..projection import DEFAULT, Projector
from ..projection import make as make_projector
from .capture import GradientCapture
from .inputs import iter_batches, num_inputs
from .result import FeatureResult


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def as_inputs(x):
    """A numpy array (or a tuple/dict holding numpy arrays) as the same sample batch of tensors (no copy);
    anything else — tensors, PaddedTokens, Datasets — returned unchanged (the same object)."""
    if isinstance(x, np.ndarray):
        return V.tensor(x, "inputs", dtype=None, finite=False, nonempty=False)
    values = x if isinstance(x, tuple) else x.values() if isinstance(x, dict) else ()
    if not any(isinstance(v, np.ndarray) for v in values):
        return x
    if isinstance(x, tuple):
        return tuple(as_inputs(v) for v in x)
    return type(x)({k: as_inputs(v) for k, v in x.items()})


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A device tensor copied to the CPU: on CUDA into pinned memory, non-blocking (valid after
    :func:`host_ready`); a CPU tensor as it is."""
    if t.device.type == "cuda":
        host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        host.copy_(t, non_blocking=True)
        return host
    return t


def host_ready(device) -> None:
    """Wait for the non-blocking copies of :func:`to_host` on ``device`` (a no-op off CUDA)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def refuse_nonfinite(bad: torch.Tensor, start: int) -> None:
    """A DNTKError naming the samples (global indices: start + position) flagged in ``bad`` [B], if any."""
    if bool(bad.any()):
        idx = (torch.nonzero(bad).flatten() + start).tolist()
        raise DNTKError(f"non-finite gradients or logits for sample indices {idx[:20]}{' ...' if len(idx) > 20 else ''}; "
                        "check those inputs for NaN/inf and the model for overflow (e.g. run in float64)")


def default_batch_size(num_params: int, projector: Projector) -> int:
    if projector.name == "identity":
        return max(1, min(32, (256 << 20) // max(1, 4 * num_params)))
    return 32


def gradient_features(model: nn.Module, inputs, projector: Projector | str = DEFAULT, *, classes=None,
                      batch_size: int | None = None, device=None, progress: bool = True,
                      backend: str = "auto", k: int = 4096, seed: int = 0) -> FeatureResult:
    """Projected per-sample, per-logit gradients of a classifier.

    Args:
        model: a module with forward(x [B, ...]) -> logits [B, C] (or an output with ``.logits``, as
            Hugging Face models return). Evaluated in eval mode (BatchNorm uses running statistics);
            its mode is restored afterwards.
        inputs: a tensor [n, ...], a tuple of tensors [n, ...] (passed positionally), a dict of tensors
            [n, ...] (passed as keyword arguments: ``input_ids``, ``attention_mask``, ...; integer
            entries are data), a Dataset yielding x, (x, y) or dicts with a ``label``, or a DataLoader
            (not shuffled, or the rows follow its order). See :mod:`dntk.samples`.
        projector: a :class:`~dntk.projection.Projector`, or a name for :func:`dntk.projection.make`
            (then ``k`` and ``seed`` are used).
        classes: logit indices to compute (default all C).
        batch_size: samples per pass (default 32; identity features use less).
        device: where to compute; the model is moved there. Default: the model's device, and a
            tensor input on another device is an error.
        progress: show a progress bar.
        backend: ``auto`` / ``ops`` (the per-call engine of :mod:`dntk.features.capture`, exact on
            any model or refusing with a DNTKError) or ``func`` (whole-model vmap(jacrev), B·C·P memory).

    Returns:
        :class:`FeatureResult` with ``features`` float32 [C', n, k] and ``logits`` float32 [n, C].

    Scaling: E⟨φ_c(x), φ_c(x')⟩ = ⟨∇θ f_c(x), ∇θ f_c(x')⟩ over the projector's randomness.
    Peak memory: one batch's activations and recorded layer inputs (Conv2d inputs unfolded into
    patches), plus the largest per-sample weight-gradient block [B, P_layer] for projectors that
    materialise it, plus the output [C', n, k] — never P·k.
    """
    real_model(model, where="gradient_features")
    inputs = as_inputs(inputs)
    if isinstance(projector, str):
        projector = make_projector(projector, k=k, seed=seed)
    strict = device is None
    device = torch.device(device) if device is not None else model_device(model)
    model.to(device)
    capture = GradientCapture(model, backend=backend)
    projector.bind(capture.specs)
    P = capture.table.num_params
    if projector.name != "identity" and projector.dim > P:
        raise DNTKError(f"k={projector.dim} is larger than the number of parameters P={P}; a sketch cannot help here — "
                        f"use make('identity') for exact features or choose k < {P}")
    n = num_inputs(inputs)
    batch_size = default_batch_size(P, projector) if batch_size is None else batch_size
    require_int(batch_size, "batch_size", 1, "pass a positive number of samples per pass, or None for the default")

    feats, logits_all, labels_all, bad = [], [], [], []
    bar = tqdm(total=n, desc=f"features ({projector.name}, k={projector.dim})", unit="img", disable=not progress)
    for x, y, start in iter_batches(inputs, batch_size, device, strict):
        B = samples.count(x)
        sink = _RowSink(projector, B, device)
        logits = capture.run(x, classes, sink)
        n_cls = len(classes) if classes is not None else logits.shape[1]
        out = sink.stacked(n_cls, logits.dtype)  # [C', B, k]
        # non-finite samples flagged on the device and refused after the loop (one read-back, not one a batch);
        # the results travel to pinned host memory without a synchronisation on CUDA
        bad.append(~torch.isfinite(out).all(dim=2).all(dim=0) | ~torch.isfinite(logits).all(dim=1))
        feats.append(to_host(out.float()))
        logits_all.append(to_host(logits.float()))
        if y is not None:
            labels_all.append(to_host(y))
        bar.update(B)
    bar.close()
    host_ready(device)
    refuse_nonfinite(torch.cat(bad).cpu(), 0)
    resolved = list(range(logits_all[0].shape[1])) if classes is None else [int(c) for c in classes]
    labels = torch.cat(labels_all) if labels_all and len(labels_all) == len(feats) else None
    return FeatureResult(torch.cat(feats, 1), torch.cat(logits_all), labels, resolved, projector,
                         paths=capture.path_summary(), num_params={s.name: s.numel for s in capture.specs},
                         engine_seconds=dict(capture.seconds) if capture.backend == "ops" else {})


class _RowSink:
    """Projects into one [B, k] row per logit, allocated when the logit's first gradient arrives
    (the number of logits is known only after the forward pass)."""

    def __init__(self, projector, B, device):
        self.projector, self.B, self.device = projector, B, device
        self.rows: dict[int, torch.Tensor] = {}
        self.cache: dict = {}

    def _row(self, c, dtype):
        r = self.rows.get(c)
        if r is None:  # float64 models accumulate in float64; half-precision ones in float32
            dtype = dtype if dtype in (torch.float32, torch.float64) else torch.float32
            r = self.rows[c] = torch.zeros(self.B, self.projector.dim, device=self.device, dtype=dtype)
        return r

    def block(self, c, name, block):
        self.projector.project(name, block, self._row(c, block.dtype))

    def outer(self, c, name, g, a, fixed_a=True):
        self.projector.project_outer(name, g, a, self._row(c, g.dtype), self.cache if fixed_a else {})

    def table_rows(self, c, name, idx, vals):
        self.projector.project_rows(name, idx, vals, self._row(c, vals.dtype))

    def rowscaled(self, c, name, d, what):
        self.projector.project_rowscaled(name, d, what, self._row(c, d.dtype), self.cache)

    def stacked(self, n_classes: int, dtype) -> torch.Tensor:
        """[C', B, k]; a logit no parameter's gradient reached has zero features."""
        return torch.stack([self.rows[c] if c in self.rows else self._row(c, dtype) for c in range(n_classes)])
