"""The capture: one batch's forward under the recorder, the layouts of its recorded outputs (measured,
or cached and verified), then per logit one backward to the recorded outputs and each call's per-sample
gradient by its op rule or op-vjp, handed to a :class:`Sink`."""

from __future__ import annotations

import time

from contextlib import contextmanager
from typing import Protocol, runtime_checkable

import torch
import torch.nn as nn

from ... import samples
from ...errors import DNTKError
from ...projection.base import BlockSpec
from . import checks
from .emit import Accumulator
from .layouts import Layout, LayoutError, measure_layouts, split_batch
from .params import (PATHS, analysis_mode, check_logits, compiled_parts, parameter_table, random_forward_message,
                     resolve_classes, rng_states)
from .recorder import Recorder, Use
from .rules import run_step


_WATCHERS: list[dict] = []   # open track_rules() counters


@contextmanager
def track_rules():
    """Count, while open, the recorded calls each op rule planned in every capture: yields
    {rule kind: calls} (what :func:`dntk.features.check_rule` reads to assert a rule was taken)."""
    taken: dict[str, int] = {}
    _WATCHERS.append(taken)
    try:
        yield taken
    finally:
        _WATCHERS.remove(taken)


@runtime_checkable
class Sink(Protocol):
    """Where a capture puts the gradients of a batch. ``c`` is the position of the logit in ``classes``;
    a parameter may receive one ``outer`` and one ``block`` per logit (its uses of each kind summed).

    ``block(c, name, block)``: a materialised per-sample gradient block [B, numel].
    ``outer(c, name, g, a, fixed_a=True)``: a weight gradient Σ_t g_t a_tᵀ in factors g [B, rows, T],
    a [B, cols, T]; ``fixed_a`` says a is the same tensor for every logit of the batch (so a sink may
    cache transforms of it).

    Optional, for sinks that can use the structure (else the engine forms the block and calls ``block``):
    ``table_rows(c, name, idx, vals)``: an embedding table's gradient Σ_t e_{idx[b, t]} vals[b, t]ᵀ, idx [B, T],
    vals [B, T, cols]; ``rowscaled(c, name, d, what)``: diag(d_b) Ŵ with d [B, rows] and a fixed Ŵ [rows, cols]
    (a standardised weight's, :mod:`~dntk.features.capture.derivations`)."""

    def block(self, c: int, name: str, block: torch.Tensor) -> None: ...

    def outer(self, c: int, name: str, g: torch.Tensor, a: torch.Tensor, fixed_a: bool = True) -> None: ...


class GradientCapture:
    """Computes per-sample, per-logit gradients of one batch and feeds them to a sink.

    The gradients go to a :class:`Sink`. ``paths`` maps each parameter name to the set of public paths
    its gradient has taken so far (``factored``, ``closed``, ``derived``, ``op-vjp``, ``func``; see the
    package docstring); ``rules_taken`` counts, per op rule kind, the recorded calls that rule planned
    (closed form) — a call it recorded but whose layout sent it to op-vjp is not counted.
    """

    def __init__(self, model: nn.Module, backend: str = "auto"):
        from ...validate import real_model

        real_model(model)
        self.model = model
        self.table = parameter_table(model)
        if backend == "auto":
            backend = "ops"
        if backend not in ("ops", "func"):
            raise DNTKError(f"unknown backend {backend!r}; use 'auto' (= 'ops'), 'ops' or 'func'")
        self.backend = backend
        self.paths: dict[str, set[str]] = {}
        self.rules_taken: dict[str, int] = {}
        self._layouts: dict[tuple, list] = {}
        self._passes = 0
        self.measured = 0      # batches whose layouts were measured (measure_layouts + samples run alone)
        self.verified = 0      # batches that reused cached layouts, verified by _still_holds
        # wall seconds per phase, over every batch: the recorded forward (and the hidden-use check), the layout
        # measurement or verification and the samples run alone, the per-logit backward passes, the rules'
        # emits (plans included), and the sink (projection). Host timers: on CUDA, kernels still queued count
        # toward the phase that waits for them.
        self.seconds = {"record": 0.0, "check": 0.0, "backward": 0.0, "emit": 0.0, "project": 0.0}
        self.remeasured = 0    # batches the cached layouts did not explain (measured afresh: refused if they mix)

    @property
    def specs(self) -> list[BlockSpec]:
        return self.table.specs

    def path_summary(self) -> dict[str, str]:
        """{parameter name: 'factored' | 'closed' | … joined by '+'}; 'none' when no gradient has reached it."""
        return {n: "+".join(p for p in PATHS if p in self.paths.get(n, ())) or "none" for n in self.table.params}

    def run(self, x, classes: list[int] | None, sink: Sink) -> torch.Tensor:
        """Feed the gradients of batch x to ``sink``; return the logits [B, C] (detached). x: a tensor
        [B, ...], a tuple (positional) or a dict (keyword) of tensors [B, ...] (:mod:`dntk.samples`)."""
        if torch.is_inference_mode_enabled():
            # under torch.inference_mode() no autograd graph is recorded, so every gradient would silently be
            # zero: leave it for the pass, with the inputs copied into ordinary tensors (exact, as outside)
            with torch.inference_mode(False):
                x = samples.map_leaves(torch.clone, x)
                inference = [n for n, p in self.table.params.items() if p.is_inference()]
                if inference:
                    raise DNTKError(f"parameters {', '.join(inference[:5])} were created under torch.inference_mode(), "
                                    "so autograd cannot differentiate them; build or load the model outside "
                                    "inference_mode (torch.no_grad() is fine)")
                return self.run(x, classes, sink)
        if self.backend == "ops":
            with torch.enable_grad():  # also when called under no_grad: the engine differentiates
                return self._run_ops(x, classes, sink)
        return self._run_func(x, classes, sink)

    # -- op-level engine -----------------------------------------------------------------------------
    def _run_ops(self, x, classes, sink):
        model, table = self.model, self.table
        self._passes += 1
        rec = Recorder(table, self._passes)
        clock = time.perf_counter
        t0 = clock()
        B = samples.count(x)
        with analysis_mode(model), torch.enable_grad():
            leaves = []   # the floating inputs, differentiated for the sample-mixing check; integer inputs are data

            def tag(t):
                leaf = t.detach()
                if leaf.is_floating_point():
                    leaf.requires_grad_(True)
                    leaves.append(leaf)
                    leaf = leaf.clone()  # not a leaf: the model may modify its input in place
                leaf._dntk_b = True
                return leaf

            xin = samples.map_leaves(tag, x)
            rng = rng_states(x)
            try:
                with rec:
                    out = samples.call(model, xin)
            except DNTKError:
                raise
            except Exception as e:
                compiled = compiled_parts(model)
                hint = (f"; {compiled[0]} is compiled, scripted or traced code, which cannot be recorded call by call — "
                        "pass the plain eager module, or use backend='func'" if compiled else
                        "; check that the inputs have the shape and dtype the model expects (run "
                        "model(inputs[:2]) to see the same error outside dntk)")
                raise DNTKError(f"the model's forward pass failed under dntk's call recorder ({type(e).__name__}: {e}) "
                                f"on inputs {samples.describe(x)}{hint}") from e
            if rng_states(x) != rng:
                raise DNTKError(random_forward_message("it drew random numbers from torch's generator during the pass"))
            logits = check_logits(out, B)
        classes = resolve_classes(classes, logits.shape[1])
        uses = rec.uses
        outs = [o for u in uses for o in u.outs]
        if logits.requires_grad:
            # every use of a parameter the recorder saw went through an alias; a path from the logits to the
            # parameter itself is a use it could not see (custom autograd.Function, TorchScript, a weight cached
            # outside the pass) whose gradient would be silently missing
            params = list(table.params.values())
            reach = torch.autograd.grad(logits.sum(), params, retain_graph=True, allow_unused=True)
            hidden = [n for n, g in zip(table.params, reach) if g is not None]
            if hidden:
                raise DNTKError(
                    f"parameters {', '.join(hidden[:5])}{' ...' if len(hidden) > 5 else ''} reach the logits through a "
                    "call dntk cannot see (a custom autograd.Function, TorchScript/compiled code, or a tensor computed "
                    "from them before this forward pass and cached); their per-sample gradients would be wrong — "
                    "write that part in plain torch operations, or use backend='func'")
        if logits.requires_grad and not getattr(logits, "_dntk_b", False):
            raise DNTKError("the logits do not depend on the input as far as dntk can trace (the data left torch, e.g. "
                            "through .item(), .tolist() or int(), before reaching the parameters); per-sample "
                            "gradients cannot be attributed — keep the computation in torch tensor operations")
        if B == 1 and self._passes == 1:
            self._check_repeatable(x, logits)   # a random forward drawing from its own generator differs on a rerun
        if not logits.requires_grad or not outs:
            return logits.detach()  # no trainable parameter reaches the logits: every gradient is zero

        t1 = clock()
        self.seconds["record"] += t1 - t0
        layouts = [None] * len(outs)
        if B > 1:
            sig = (B, tuple((u.name, u.roots, tuple(tuple(o.shape) for o in u.outs)) for u in uses))
            # entries that are not differentiated (integer token ids, masks) can mix samples unseen by the
            # weighted backward passes: every sample of such a batch is run alone, measured or verified (still_holds)
            data_only = checks.integer_inputs(x)
            layouts = self._layouts.get(sig)
            if layouts is not None and not self._still_holds(x, logits, outs + leaves, layouts, B):
                layouts = None   # this batch is not explained by the cached layouts: measured afresh below
                self.remeasured += 1
            if layouts is None:
                probe = outs + leaves
                try:
                    measured, unique, unused = measure_layouts(logits, probe, checked=len(outs))
                    for j in range(len(outs), len(probe)):
                        if measured[j] is not None and measured[j] != Layout(0, "major"):
                            raise LayoutError(j)
                except LayoutError as e:
                    where = ("the input" if e.args[0] >= len(outs) else
                             f"the output of {owner(uses, e.args[0]).name} (parameters {', '.join(owner(uses, e.args[0]).roots)})")
                    raise DNTKError(
                        f"the samples of a batch interact in the model: an entry of {where} influences the logits of "
                        "more than one sample, so per-sample gradients of a batch are not the model's gradients on "
                        "single inputs; use batch_size=1, or remove the cross-sample operation (e.g. batch "
                        "statistics)") from None
                # then every sample of the batch is run alone, not just the first few
                self._check_alone(x, logits, n=B if data_only else 4)
                if not data_only:
                    self._check_alone_gradients(x, logits, leaves, n=min(B, 4))
                layouts = measured[: len(outs)]
                self.measured += 1
                if unique and all(isinstance(lay, Layout) or (lay is None and unused[i])
                                                    for i, lay in enumerate(layouts)):
                    # unambiguous and structural: reused for the same call pattern, each later batch verified by
                    # _still_holds (two weighted backward passes and one sample alone instead of a measurement)
                    self._layouts[sig] = layouts
        t2 = clock()
        self.seconds["check"] += t2 - t1
        per_use, k = [], 0
        for u in uses:
            per_use.append(layouts[k : k + len(u.outs)])
            k += len(u.outs)

        plans = [self._plan(u, lays, B) for u, lays in zip(uses, per_use)]
        factors: dict[str, list] = {}
        for u, plan in zip(uses, plans):
            owner_ = plan.get("a_param") or (u.weight.param if u.weight is not None else None)
            if plan.get("a") is not None and owner_ is not None:
                factors.setdefault(owner_, []).append(plan["a"])
        a_cat = {n: (fs[0] if len(fs) == 1 else torch.cat(fs, -1)) for n, fs in factors.items()}

        t_emit = clock() - t2
        for ci, c in enumerate(classes):
            ta = clock()
            gs = torch.autograd.grad(logits[:, c].sum(), outs, retain_graph=True, allow_unused=True)
            tb = clock()
            self.seconds["backward"] += tb - ta
            acc = Accumulator(rec.aliases, self._note)
            k = 0
            for u, plan in zip(uses, plans):
                g_u = gs[k : k + len(u.outs)]
                k += len(u.outs)
                if all(g is None for g in g_u) and plan.get("a") is None:
                    continue  # unreachable from the logits: zero gradient (factored uses still add zero columns)
                self._emit(u, plan, g_u, B, acc)
            tc = clock()
            t_emit += tc - tb
            for name, gl in acc.factors.items():
                if isinstance(name, tuple):  # x @ W: the column side changes with the logit, so no a-side cache
                    rows = torch.cat([r for r, _ in gl], -1)
                    cols = torch.cat([c for _, c in gl], -1)
                    sink.outer(ci, name[1], rows, cols, fixed_a=False)
                else:
                    sink.outer(ci, name, gl[0] if len(gl) == 1 else torch.cat(gl, -1), a_cat[name])
            table_rows = getattr(sink, "table_rows", None)
            for name, parts in acc.table_rows.items():
                for idx, vals in parts:   # an embedding table's rows: added to the sketch by a sink that can, else formed
                    if table_rows is not None:
                        table_rows(ci, name, idx, vals)
                    else:
                        acc.add_block(name, acc.dense_rows(name, idx, vals))
            rowscaled = getattr(sink, "rowscaled", None)
            for name, parts in acc.rowscaled.items():
                for d, what in parts:   # diag(d_b) Ŵ: sketched from Ŵ by a sink that can, else formed
                    if rowscaled is not None:
                        rowscaled(ci, name, d, what)
                    else:
                        acc.add_block(name, d[:, :, None] * what.to(d.dtype)[None])
            for name, blk in acc.blocks.items():
                sink.block(ci, name, blk)
            self.seconds["project"] += clock() - tc
        self.seconds["emit"] += t_emit
        return logits.detach()

    # the checks (dntk.features.capture.checks), as methods so a test can replace one
    def _check_repeatable(self, x, logits):
        return checks.check_repeatable(self, x, logits)

    def _still_holds(self, x, logits, probe: list, layouts: list, B: int) -> bool:
        return checks.still_holds(self, x, logits, probe, layouts, B)

    def _alone(self, x, i: int, r: torch.Tensor, with_grad: bool):
        return checks.alone(self, x, i, r, with_grad)

    def _check_alone_gradients(self, x, logits, leaves, n: int = 4):
        return checks.check_alone_gradients(self, x, logits, leaves, n)

    def _check_alone(self, x, logits, n: int = 4):
        return checks.check_alone(self, x, logits, n)

    def _note(self, names, path):
        for n in names:
            self.paths.setdefault(n, set()).add(path)

    def _plan(self, u: Use, lays: list, B: int) -> dict:
        """Decide, once per batch, how each recorded call is differentiated per sample: by its op rule's
        closed form, or (generic call, a layout the rule does not support, an index map) by op-vjp."""
        lay = lays[0] if lays else None
        plan = None
        if u.rule is not None and not (B > 1 and lay is not None and not isinstance(lay, Layout)):
            if B > 1 and lay is None:
                return {"via": "none"}   # no gradient reached the call in this batch
            plan = run_step(u.rule, "plan", u, lay, B)
        if plan is None:
            if u.cut is None:
                u.cut = [run_step(u.rule, "recompute", u)]
            return {"via": "op-vjp", "layouts": lays}
        for counter in (self.rules_taken, *_WATCHERS):
            counter[u.kind] = counter.get(u.kind, 0) + 1
        return {**plan, "via": "rule"}

    def _emit(self, u: Use, plan: dict, g_u, B: int, acc: Accumulator) -> None:
        if plan["via"] == "none":
            return
        if plan["via"] == "op-vjp":
            acc.op_vjp(u, plan["layouts"], g_u, B)
            return
        g = g_u[0] if g_u[0] is not None else torch.zeros_like(u.outs[0])
        run_step(u.rule, "emit", u, plan, split_batch(g, plan["layout"], B), B, acc)

    # -- generic torch.func backend ----------------------------------------------------------------
    def _run_func(self, x, classes, sink):
        try:
            return self._run_func_inner(x, classes, sink)
        except RuntimeError as e:
            if "randomness" in str(e):
                raise DNTKError(random_forward_message("vmap refused its random operation")) from e
            raise DNTKError(f"backend='func' (whole-model vmap(jacrev)) cannot run this model on inputs "
                            f"{samples.describe(x)} ({type(e).__name__}: {str(e)[:300]}); data-dependent control "
                            "flow (Hugging Face padding logic, recurrent layers) defeats vmap — use the default "
                            "backend") from e

    def _run_func_inner(self, x, classes, sink):
        from torch.func import functional_call, jacrev, vmap

        model, table = self.model, self.table
        B = samples.count(x)
        x = dict(x) if isinstance(x, dict) else x   # a plain pytree for vmap
        with analysis_mode(model):
            with torch.no_grad():
                rng = rng_states(x)
                logits = check_logits(samples.call(model, x), B)
                if rng_states(x) != rng:
                    raise DNTKError(random_forward_message("it drew random numbers from torch's generator during the pass"))
            classes_r = resolve_classes(classes, logits.shape[1])
            params = {n: p.detach() for n, p in table.params.items()}
            idx = torch.tensor(classes_r, device=logits.device)

            def f(p, xi):
                xb = samples.map_leaves(lambda t: t.unsqueeze(0), xi)
                args, kwargs = ((xb,), {}) if isinstance(xb, torch.Tensor) else ((xb, {}) if isinstance(xb, tuple)
                                                                                 else ((), xb))
                out = samples.logits_of(functional_call(model, p, args, kwargs, strict=False))
                return out.squeeze(0).index_select(0, idx)

            jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)  # name -> [B, C', *shape]
        for ci in range(len(classes_r)):
            for spec in table.specs:
                sink.block(ci, spec.name, jac[spec.name][:, ci].reshape(B, -1))
                self._note([spec.name], "func")
        return logits.detach()


def owner(uses, i):
    """The recorded call whose outputs hold position i of the flattened outputs."""
    k = 0
    for u in uses:
        k += len(u.outs)
        if i < k:
            return u
    return uses[-1]
