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
from .capture import OpRule, analysis_mode, parameter_table, track_rules
from .extract import gradient_features
from .ntk import empirical_ntk

# What counts as exact, by the model's (lowest-precision trainable) dtype. A parameter p passes when
# ‖Φ_p − J_p‖ ≤ tol·‖J_p‖ + atol, atol = 16·u·‖J‖ (u: the dtype's unit round-off): its error relative to its
# own gradient, except where that gradient is at the level of the whole Jacobian's rounding noise (a gradient
# that is mathematically zero computes to noise ~u·‖J‖, e.g. a shift before a LayerNorm). Per-parameter tol:
# float64 1e-6 (the identity features are stored in float32: ≈ 3e-8 relative); float32 1e-5 (engine and
# autograd sum in different orders: ≤ 7.4e-7 measured on a ResNet-18 and on transformer layers); bf16/fp16
# 16·u. Kernel (empirical_ntk) tol: float64 1e-9; lower precisions max(16·u, 4·√P·u) — its entries are sums
# over P terms in the model's dtype, whose rounding grows like √P·u (5.8e-5 measured on a ResNet-18, P = 11.2M).
FEATURE_TOLERANCE = {torch.float64: 1e-6, torch.float32: 1e-5}


def _unit_roundoff(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) / 2


def default_tolerances(dtype: torch.dtype, P: int) -> tuple[float, float]:
    """(features, kernel) relative tolerances of :func:`check_model` for a model of ``dtype`` with P
    trainable parameter entries (see the comment above :data:`FEATURE_TOLERANCE`)."""
    u = _unit_roundoff(dtype)
    feat = FEATURE_TOLERANCE.get(dtype, 16 * u)
    kern = 1e-9 if dtype == torch.float64 else max(16 * u, 4 * P ** 0.5 * u, 1e-5 if dtype == torch.float32 else 0)
    return feat, kern


def absolute_floor(dtype: torch.dtype) -> float:
    """atol / ‖J‖ of :func:`check_model`'s per-parameter test: 16 unit round-offs of ``dtype``."""
    return 16 * _unit_roundoff(dtype)


@dataclass
class ModelCheck:
    """What :func:`check_model` found.

    exact: every parameter's per-sample gradient within ``tolerance`` of its own norm (plus the rounding
        floor ``atol`` = 16·u·‖J‖) and the exact kernel (:func:`dntk.empirical_ntk`) within
        ``kernel_tolerance`` of brute-force autograd, and nothing refused.
    refusal: the engine's error (why it will not compute this model's features), else None.
    n, classes, parameters, dtype: samples checked, logits, trainable parameter entries, the precision judged.
    max_relative_error: the worst parameter's ‖Φ_p − J_p‖ / ‖J_p‖ over the samples and logits (inf where
        J_p = 0 and Φ_p is not). kernel_relative_error: ‖K − K_ref‖ / ‖K_ref‖ of the per-class kernels (K
        of :func:`dntk.empirical_ntk`, float64).
    per_parameter: [{name, numel, path, relative_error, error ‖Φ_p − J_p‖, norm ‖J_p‖, passed}].
    path_shares: {path: fraction of the parameters}.
    rules_taken: {op rule kind: recorded calls it planned} in the engine's pass (:mod:`dntk.features.capture.rules`).
    sketch: {name, k, kernel_relative_error} of the default sketch against the exact kernel (≈ √(2/k)
        scale: random, reported, not judged)."""

    exact: bool
    n: int
    classes: int | None
    parameters: int
    tolerance: float
    kernel_tolerance: float
    dtype: str = "float32"
    atol: float | None = None
    refusal: str | None = None
    max_relative_error: float | None = None
    kernel_relative_error: float | None = None
    per_parameter: list[dict] = field(default_factory=list)
    path_shares: dict[str, float] = field(default_factory=dict)
    rules_taken: dict[str, int] = field(default_factory=dict)
    sketch: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """A few lines for a terminal: the verdict, the worst parameters and the paths."""
        head = (f"{'EXACT' if self.exact else 'NOT EXACT'}: {self.n} samples × {self.classes or '?'} logits, "
                f"P = {self.parameters:,}, {self.dtype}, tolerance {self.tolerance:.3g} (kernel {self.kernel_tolerance:.3g})")
        if self.refusal is not None:
            return head + f"\nrefused: {self.refusal}"
        lines = [head, f"worst parameter relative error {self.max_relative_error:.2e}; kernel relative error "
                       f"{self.kernel_relative_error:.2e}",
                 "paths: " + ", ".join(f"{p} {s:.1%}" for p, s in sorted(self.path_shares.items(), key=lambda t: -t[1]))]
        worst = sorted(self.per_parameter, key=lambda r: (r["passed"], -r["relative_error"]))[:5]
        lines += [f"  {r['name']} ({r['numel']:,}, {r['path']}): {r['relative_error']:.2e}"
                  + ("" if r["passed"] else "  FAILED") for r in worst]
        if self.sketch:
            lines.append(f"{self.sketch['name']} k = {self.sketch['k']}: kernel relative error "
                         f"{self.sketch['kernel_relative_error']:.3f} against the exact kernel (random; ≈ √(2/k) "
                         f"= {(2 / self.sketch['k']) ** 0.5:.3f} scale)")
        return "\n".join(lines)


def brute_force_jacobian(model: nn.Module, x) -> torch.Tensor:
    """J [n, C, P]: ∇θ f_c(x_i) for each sample run alone (a batch of one, eval mode, every submodule's
    mode restored) and each logit, one backward each, over :func:`parameter_table`'s parameters in its order
    (the identity projector's layout); a parameter no gradient reaches contributes zeros. x: the model's
    input form (:mod:`dntk.samples`)."""
    table = parameter_table(model)
    params = [table.params[s.name] for s in table.specs]
    with analysis_mode(model):
        rows = _per_sample_rows(model, x, params)
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
    eval mode, every submodule's mode restored (and its device, when ``device`` moved it). inputs: a
    tensor [n, ...], a tuple or a dict of tensors [n, ...] (the
    forms :func:`dntk.gradient_features` takes), n ≥ 2 — a batch-dependent model shows only in a batch.
    tolerance / kernel_tolerance: the relative errors of the features and of the kernel counted as exact
    (default :func:`default_tolerances` by the model's dtype and P).
    sketch: a projector name whose kernel error at ``k`` is reported (None: skip; k is capped at P − 1).
    Returns a :class:`ModelCheck`; a refusal by the engine is a result (``exact`` False), not an error. A
    forward that fails on the inputs, or returns no logits [n, C], raises a DNTKError naming the cause."""
    if not isinstance(model, nn.Module):
        raise DNTKError(f"check_model needs a torch.nn.Module, got {type(model).__name__}")
    n = samples.count(inputs)
    if n < 2:
        raise DNTKError(f"check_model needs at least 2 inputs (got {n}): a batch-dependent model only shows in a "
                        "batch; pass 2–8 of your own samples")
    require_int(k, "k", 1, "pass the sketch dimension to report (e.g. 4096) or sketch=None")
    table = parameter_table(model)
    P = table.num_params
    # judged at the lowest precision among the trainable parameters (a float64 body with a float32 head: float32)
    dtype = max((p.dtype for p in table.params.values()), key=lambda d: torch.finfo(d).eps)
    default = default_tolerances(dtype, P)
    tol = default[0] if tolerance is None else float(tolerance)
    ktol = default[1] if kernel_tolerance is None else float(kernel_tolerance)
    if not (tol > 0 and ktol > 0):
        raise DNTKError(f"tolerances must be > 0, got tolerance={tolerance}, kernel_tolerance={kernel_tolerance}")
    home = next(iter(table.params.values())).device
    if device is not None:
        model.to(device)
        inputs = samples.to(inputs, device)
    try:
        with analysis_mode(model):
            classes = _plain_forward(model, inputs, n)
        base = dict(n=n, classes=classes, parameters=P, tolerance=tol, kernel_tolerance=ktol, dtype=str(dtype)[6:])
        try:
            with track_rules() as taken:
                res = gradient_features(model, inputs, "identity", batch_size=n, progress=False)
        except DNTKError as e:          # the forward ran above: this is the engine declining the model
            return ModelCheck(False, refusal=str(e), **base)
        try:
            J = brute_force_jacobian(model, inputs).to(res.features.device)   # [n, C, P]
        except RuntimeError as e:       # e.g. BatchNorm in train mode inside forward: one sample cannot run alone
            return ModelCheck(False, refusal=f"a sample cannot run alone ({type(e).__name__}: {e}); dntk's per-sample "
                                            "gradients are those of each sample run alone", **base)
        F = res.features.to(J.dtype).transpose(0, 1)                         # [n, C, P]
        atol = absolute_floor(dtype) * float(J.norm())
        rows, off = [], 0
        for spec in table.specs:
            a, b = F[..., off:off + spec.numel], J[..., off:off + spec.numel]
            err, ref = float((a - b).norm()), float(b.norm())
            rel = err / ref if ref > 0 else (0.0 if err == 0 else float("inf"))
            rows.append({"name": spec.name, "numel": spec.numel, "path": res.paths.get(spec.name, "none"),
                         "relative_error": rel, "error": err, "norm": ref, "passed": err <= tol * ref + atol})
            off += spec.numel
        K_ref = torch.einsum("icp,jcp->cij", J.double(), J.double())
        K = empirical_ntk(model, inputs, batch_size=n).to(K_ref.device)
        k_err = float((K - K_ref).norm() / (K_ref.norm() or 1.0))
        worst = max(r["relative_error"] for r in rows)
        out = ModelCheck(all(r["passed"] for r in rows) and k_err <= ktol, atol=atol, max_relative_error=worst,
                         kernel_relative_error=k_err, per_parameter=rows, path_shares=res.path_shares(),
                         rules_taken=dict(taken), **base)
        if sketch is not None and P > 1:
            kk = min(k, P - 1)
            sk = gradient_features(model, inputs, sketch, k=kk, seed=seed, batch_size=n, progress=False)
            out.sketch = {"name": sketch, "k": kk,
                          "kernel_relative_error": float((sk.kernel().to(K_ref) - K_ref).norm() / (K_ref.norm() or 1.0))}
        return out
    finally:
        if device is not None:
            model.to(home)


def check_rule(rule, model: nn.Module, inputs, **check_options) -> ModelCheck:
    """Test an op rule (an :class:`~dntk.features.capture.OpRule` or its kind, e.g. ``"rms_norm"``) on a
    model that uses it: :func:`check_model` on ``inputs`` (its options passed on), with the rule
    asserted *taken* — a rule that records nothing, or whose plan always declines, would otherwise
    pass through the exact op-vjp fallback unseen. Raises a DNTKError when the rule was not taken or
    the features are not exact (the check's summary in the message); returns the ModelCheck."""
    kind = rule.kind if isinstance(rule, OpRule) else str(rule)
    if isinstance(rule, OpRule):
        from .capture.rules import rule_for

        stale = [getattr(f, "__name__", str(f)) for f in rule.functions if rule_for(f) is not rule]
        if stale:   # another rule of the same kind would be the one tested
            raise DNTKError(f"check_rule({kind!r}): this rule object is not the one registered for {', '.join(stale)}; "
                            "register it first (dntk.features.register(rule, replace=True))")
    res = check_model(model, inputs, **check_options)
    if res.refusal is not None:
        raise DNTKError(f"check_rule({kind!r}): the engine refused the model: {res.refusal}")
    if not res.rules_taken.get(kind):
        raise DNTKError(f"check_rule({kind!r}): the rule was not taken on this model (rules taken: "
                        f"{res.rules_taken or 'none'}); check that it is registered, that the model calls one of its "
                        "functions, and that its record/plan do not decline these calls")
    if not res.exact:
        raise DNTKError(f"check_rule({kind!r}): taken {res.rules_taken[kind]}× but not exact:\n{res.summary()}")
    return res


def _plain_forward(model, inputs, n: int) -> int:
    """Run the model once on the inputs (no gradients) and return C: a forward that fails, or an output
    that is not logits [n, C], is the caller's problem to fix, not a refusal of the engine."""
    try:
        with torch.no_grad():
            out = samples.call(model, inputs)
    except Exception as e:   # noqa: BLE001 — any failure of the user's forward, named with its cause
        raise DNTKError(f"check_model: the model's forward on these inputs failed ({type(e).__name__}: {e}); check the "
                        "inputs' shape, dtype and device against the model") from e
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != n:
        what = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise DNTKError(f"check_model: the model returned {what} for {n} inputs; expected logits [{n}, C] (a tensor, "
                        "or an output with .logits / ['logits'])")
    return int(out.shape[1])
