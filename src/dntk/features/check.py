"""Is dntk exact on my model? :func:`check_model` answers on a few of the user's own inputs.

It computes the exact (identity) features of those inputs with the per-call engine, as
:func:`dntk.gradient_features` does, and compares every parameter's per-sample, per-logit gradient with
brute-force autograd (each sample run alone, one backward per logit, eval mode) — the independent
reference of the test suite. It also reports which path each parameter took and how far a sketch's
kernel is from the exact one at the chosen k (a random error, not a pass/fail).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from .. import samples
from ..errors import DNTKError
from ..validate import require_int
from .capture import parameter_table
from .engine import gradient_features
from .ntk import empirical_ntk

# relative errors counted as exact, by the model's dtype: (per-parameter features, kernel). The identity
# features are stored in float32 (FeatureResult), so a float64 model's features carry float32 rounding
# (≈ 3e-8 relative) while its kernel (empirical_ntk, float64 throughout) meets autograd to round-off. A
# float32 model's engine and autograd sum in different orders (a few 1e-7 per parameter on a ResNet-18), and
# its kernel entries are float32 sums over P terms: their rounding grows like √P·u (u = 2⁻²⁴; 5.8e-5 measured
# on a ResNet-18, P = 11.2M), so the float32 kernel tolerance is max(1e-4, 4·√P·u) (8e-4 at P = 11.2M).
TOLERANCE = {torch.float64: (1e-6, 1e-9), torch.float32: (1e-4, 1e-4)}


def default_tolerances(dtype: torch.dtype, P: int) -> tuple[float, float]:
    """(features, kernel) relative tolerances of :func:`check_model` for a model of ``dtype`` with P
    trainable parameter entries (see :data:`TOLERANCE`)."""
    feat, kern = TOLERANCE.get(dtype, TOLERANCE[torch.float32])
    if dtype != torch.float64:
        kern = max(kern, 4 * P ** 0.5 * 2.0 ** -24)
    return feat, kern


@dataclass
class ModelCheck:
    """What :func:`check_model` found.

    exact: every parameter's per-sample gradient within ``tolerance`` and the exact kernel
        (:func:`dntk.empirical_ntk`) within ``kernel_tolerance`` of brute-force autograd, and nothing refused. refusal: the engine's error (why it will not compute this model's
        features), else None. n, classes, parameters: samples checked, logits, trainable parameter entries.
    max_relative_error / kernel_relative_error: worst parameter's ‖Φ_p − J_p‖ / ‖J_p‖ (over the samples
        and logits; a parameter no gradient reaches is compared absolutely, relative to ‖J‖) and
        ‖K − K_ref‖ / ‖K_ref‖ of the per-class kernels (K of :func:`dntk.empirical_ntk`, float64). per_parameter: [{name, numel, path, relative_error}].
    path_shares: {path: fraction of the parameters}. sketch: {name, k, kernel_relative_error} of the
        default sketch against the exact kernel (≈ √(2/k) scale: random, reported, not judged)."""

    exact: bool
    n: int
    classes: int
    parameters: int
    tolerance: float
    kernel_tolerance: float
    refusal: str | None = None
    max_relative_error: float | None = None
    kernel_relative_error: float | None = None
    per_parameter: list[dict] = field(default_factory=list)
    path_shares: dict[str, float] = field(default_factory=dict)
    sketch: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """A few lines for a terminal: the verdict, the worst parameters and the paths."""
        head = (f"{'EXACT' if self.exact else 'NOT EXACT'}: {self.n} samples × {self.classes} logits, "
                f"P = {self.parameters:,}, tolerance {self.tolerance:g} (kernel {self.kernel_tolerance:g})")
        if self.refusal is not None:
            return head + f"\nrefused: {self.refusal}"
        lines = [head, f"worst parameter relative error {self.max_relative_error:.2e}; kernel relative error "
                       f"{self.kernel_relative_error:.2e}",
                 "paths: " + ", ".join(f"{p} {s:.1%}" for p, s in sorted(self.path_shares.items(), key=lambda t: -t[1]))]
        worst = sorted(self.per_parameter, key=lambda r: -r["relative_error"])[:5]
        lines += [f"  {r['name']} ({r['numel']:,}, {r['path']}): {r['relative_error']:.2e}" for r in worst]
        if self.sketch:
            lines.append(f"{self.sketch['name']} k = {self.sketch['k']}: kernel relative error "
                         f"{self.sketch['kernel_relative_error']:.3f} against the exact kernel (random; ≈ √(2/k) "
                         f"= {(2 / self.sketch['k']) ** 0.5:.3f} scale)")
        return "\n".join(lines)


def brute_force_jacobian(model: nn.Module, x) -> torch.Tensor:
    """J [n, C, P]: ∇θ f_c(x_i) for each sample run alone (a batch of one, eval mode, the model's mode
    restored) and each logit, one backward each, over :func:`parameter_table`'s parameters in its order
    (the identity projector's layout); a parameter no gradient reaches contributes zeros. x: the model's
    input form (:mod:`dntk.samples`)."""
    table = parameter_table(model)
    params = [table.params[s.name] for s in table.specs]
    was = model.training
    model.eval()
    try:
        rows = _per_sample_rows(model, x, params)
    finally:
        model.train(was)
    return torch.stack(rows).detach()


def _per_sample_rows(model, x, params) -> list[torch.Tensor]:
    rows = []
    for i in range(samples.count(x)):
        out = samples.call(model, samples.take(x, [i]))
        if out.dim() != 2 or out.shape[0] != 1:
            raise DNTKError(f"check_model: the model returned {tuple(out.shape)} for one sample; expected logits [1, C]")
        per_logit = []
        for c in range(out.shape[1]):
            grads = torch.autograd.grad(out[0, c], params, retain_graph=True, allow_unused=True)
            per_logit.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                        for g, p in zip(grads, params)]))
        rows.append(torch.stack(per_logit))
    return rows


def check_model(model: nn.Module, inputs, *, tolerance: float | None = None, kernel_tolerance: float | None = None,
                sketch: str | None = "tensorsketch", k: int = 4096, seed: int = 0, device=None) -> ModelCheck:
    """Check the per-call engine against brute-force autograd on ``inputs`` (all of them, in one batch:
    2–8 samples is plenty and costs n·C backward passes of the reference).

    model: a classifier, forward(x [n, ...]) → logits [n, C] (or an output with ``.logits``); checked in
    eval mode, its mode restored. inputs: a tensor [n, ...], a tuple or a dict of tensors [n, ...] (the
    forms :func:`dntk.gradient_features` takes), n ≥ 2 — a batch-dependent model shows only in a batch.
    tolerance / kernel_tolerance: the relative errors of the features and of the kernel counted as exact
    (default :func:`default_tolerances` by the model's dtype and P).
    sketch: a projector name whose kernel error at ``k`` is reported (None: skip; k is capped at P − 1).
    Returns a :class:`ModelCheck`; a refusal by the engine is a result (``exact`` False), not an error."""
    if not isinstance(model, nn.Module):
        raise DNTKError(f"check_model needs a torch.nn.Module, got {type(model).__name__}")
    n = samples.count(inputs)
    if n < 2:
        raise DNTKError(f"check_model needs at least 2 inputs (got {n}): a batch-dependent model only shows in a "
                        "batch; pass 2–8 of your own samples")
    require_int(k, "k", 1, "pass the sketch dimension to report (e.g. 4096) or sketch=None")
    dtype = next((p.dtype for p in model.parameters() if p.requires_grad), torch.float32)
    table = parameter_table(model)
    P = table.num_params
    default = default_tolerances(dtype, P)
    tol = default[0] if tolerance is None else float(tolerance)
    ktol = default[1] if kernel_tolerance is None else float(kernel_tolerance)
    if not (tol > 0 and ktol > 0):
        raise DNTKError(f"tolerances must be > 0, got tolerance={tolerance}, kernel_tolerance={kernel_tolerance}")
    if device is not None:
        model.to(device)
        inputs = samples.to(inputs, device)
    was = model.training
    try:
        model.eval()
        try:
            res = gradient_features(model, inputs, "identity", batch_size=n, progress=False)
        except DNTKError as e:
            logits = samples.call(model, samples.take(inputs, [0]))
            return ModelCheck(False, n, int(logits.shape[-1]), P, tol, ktol, refusal=str(e))
        J = brute_force_jacobian(model, inputs).to(res.features.device)   # [n, C, P]
        F = res.features.to(J.dtype).transpose(0, 1)                         # [n, C, P]
        total = float(J.norm()) or 1.0
        rows, off = [], 0
        for spec in table.specs:
            a, b = F[..., off:off + spec.numel], J[..., off:off + spec.numel]
            ref = float(b.norm())
            err = float((a - b).norm()) / (ref if ref > 1e-6 * total else total)
            rows.append({"name": spec.name, "numel": spec.numel, "path": res.paths.get(spec.name, "none"),
                         "relative_error": err})
            off += spec.numel
        K_ref = torch.einsum("icp,jcp->cij", J.double(), J.double())
        K = empirical_ntk(model, inputs, batch_size=n).to(K_ref.device)
        k_err = float((K - K_ref).norm() / (K_ref.norm() or 1.0))
        worst = max(r["relative_error"] for r in rows)
        out = ModelCheck(worst <= tol and k_err <= ktol, n, J.shape[1], P, tol, ktol, max_relative_error=worst,
                         kernel_relative_error=k_err, per_parameter=rows, path_shares=res.path_shares())
        if sketch is not None and P > 1:
            kk = min(k, P - 1)
            sk = gradient_features(model, inputs, sketch, k=kk, seed=seed, batch_size=n, progress=False)
            out.sketch = {"name": sketch, "k": kk,
                          "kernel_relative_error": float((sk.kernel().to(K_ref) - K_ref).norm() / (K_ref.norm() or 1.0))}
        return out
    finally:
        model.train(was)
