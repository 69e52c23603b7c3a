"""The exact per-class eNTK of inputs whose per-sample gradients do not fit in memory at once:
:func:`sliced_class_kernels` recomputes them slice by slice of the parameters (a plan from
:func:`plan_parameter_slices` sized by :func:`default_gradient_budget`) and sums each slice's Gram."""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import samples
from ..errors import DNTKError, require_int
from ..validate import real_model
from .capture import GradientCapture
from .extract import as_inputs, model_device
from .ntk import _check_inputs, _ExactSink, _num_outputs, _run_finite


_CHUNK = 1 << 16


class _SliceSink(_ExactSink):
    """Keeps, of each parameter named in ``plan``, only the flattened elements [lo, hi) of its
    per-sample gradient: plan = {name: (lo, hi)}. A factored (outer-product) gradient of a parameter
    outside the plan is never formed; blocks the engine hands over whole (closed-form, op-vjp paths)
    are formed by the engine on every pass and dropped here."""

    def __init__(self, plan: dict, widths: dict):
        super().__init__()
        self.plan, self.widths = plan, widths

    def _keep(self, c, name, flat):
        if flat.shape[1] != self.widths[name]:   # the slices index the parameter's elements: refuse a mismatch
            raise DNTKError(f"the engine's gradient block of {name} has {flat.shape[1]} elements per sample, the "
                            f"parameter {self.widths[name]}; use empirical_ntk for this model")
        lo, hi = self.plan[name]
        self._add(c, name, flat[:, lo:hi].clone())   # a copy: a view would keep the whole block alive

    def block(self, c, name, block):
        if name in self.plan:
            self._keep(c, name, block.detach().reshape(block.shape[0], -1))

    def outer(self, c, name, g, a, fixed_a=True):
        if name in self.plan:
            self._keep(c, name, torch.bmm(g, a.transpose(1, 2)).reshape(g.shape[0], -1))


def _add_gram(K: torch.Tensor, G: torch.Tensor) -> None:
    """K [C, n, n] float64 += G Gᵀ per class, G [C, n, w]: products over ≤ 65,536 elements, summed in float64."""
    for c0 in range(0, G.shape[-1], _CHUNK):
        part = G[:, :, c0 : c0 + _CHUNK]
        K += torch.bmm(part, part.transpose(1, 2)).double().cpu()


def plan_parameter_slices(widths: dict[str, int], capacity: int) -> list[dict]:
    """Cut the parameters (name → flattened width, in order) into groups of at most ``capacity``
    elements: a list of {name: (lo, hi)}; every element of every parameter lies in exactly one group."""
    require_int(capacity, "capacity", 1, "raise memory_budget_bytes")
    groups, current, room = [], {}, capacity
    for name, width in widths.items():
        lo = 0
        while lo < width:
            take = min(width - lo, room)
            current[name] = (lo, lo + take)
            lo += take
            room -= take
            if room == 0:
                groups.append(current)
                current, room = {}, capacity
    if current:
        groups.append(current)
    return groups


def default_gradient_budget(device) -> int:
    """The bytes of gradients :func:`sliced_class_kernels` holds at once when not told: on a CUDA device half
    of its free memory now (the rest is for activations, the batch's full-size blocks and K), else 4 GiB."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(1, free // 2)
    return 4 << 30


def sliced_class_kernels(model: nn.Module, x: torch.Tensor, *, memory_budget_bytes: int | None = None,
                         batch_size: int = 8, backend: str = "auto", progress: bool = False) -> tuple[torch.Tensor, dict]:
    """The exact per-class eNTK K[c, i, j] = ⟨∇θ f_c(x_i), ∇θ f_c(x_j)⟩ (float64 [C, n, n]) of inputs
    x [n, ...], with every input's gradients held in memory — never spilled to disk — by cutting the
    parameters into slices: for each slice, one gradient pass over all n inputs materialises only that
    slice's gradients ([C, n, width] in the parameters' dtype, ≤ ``memory_budget_bytes``; default
    :func:`default_gradient_budget`: half the free GPU memory on CUDA, 4 GiB otherwise) and adds their Gram
    matrices (products over ≤ 65,536 elements, summed in float64).
    Exact because ⟨g, g'⟩ is the sum over any partition of the parameters' elements (checked against
    :func:`empirical_ntk` in the tests).

    Cost: ⌈C·n·P·4 / budget⌉ gradient passes over the n inputs (the price of using no disk) and
    2·C·n²·P FLOPs of contraction; peak memory ≈ budget + one batch's gradient blocks of the slice's
    parameters (batch_size·C·their full size, formed to be cut) + one batch's activations + K.
    Returns (K, info) with info = {groups, passes, parameters, gradient_seconds, contraction_seconds,
    contraction_flops}."""
    import time

    from tqdm.auto import tqdm

    real_model(model, where="sliced_class_kernels")
    device = model_device(model)
    if memory_budget_bytes is None:
        memory_budget_bytes = default_gradient_budget(device)
    require_int(memory_budget_bytes, "memory_budget_bytes", 1, "pass the bytes of gradients to hold at once, or None "
                "for the default (half the free GPU memory on CUDA, 4 GiB otherwise)")
    require_int(batch_size, "batch_size", 1, "pass a positive number of inputs per gradient pass")
    x = as_inputs(x)
    _check_inputs(x, "x", device)
    capture = GradientCapture(model, backend=backend)
    with torch.no_grad():
        C = _num_outputs(model, samples.take(x, slice(0, 1)), capture)
    n = samples.count(x)
    # every trainable parameter (tied ones once), whether or not a given input reaches it
    widths = {name: t.numel() for name, t in capture.table.params.items()}
    P = sum(widths.values())
    dtype = next(iter(capture.table.params.values())).dtype
    itemsize = torch.empty((), dtype=dtype).element_size()
    capacity = memory_budget_bytes // (itemsize * C * n)
    if capacity < 1:
        raise DNTKError(f"memory_budget_bytes={memory_budget_bytes:,} cannot hold one gradient element of {n} inputs × "
                        f"{C} logits; raise it to at least {itemsize * C * n:,}")
    groups = plan_parameter_slices(widths, capacity)
    K = torch.zeros(C, n, n, dtype=torch.float64)
    t_grad = t_con = 0.0
    for plan in tqdm(groups, desc="exact eNTK (parameter slices)", disable=not progress, unit="slice"):
        width = sum(hi - lo for lo, hi in plan.values())
        G = torch.zeros(C, n, width, dtype=dtype, device=device)
        t = time.perf_counter()
        for s in range(0, n, batch_size):
            sink = _run_finite(capture, samples.take(x, slice(s, s + batch_size)), None, _SliceSink(plan, widths), s)
            col = 0
            for name, (lo, hi) in plan.items():
                for c in range(C):
                    blk = sink.grads.get(c, {}).get(name)
                    if blk is not None:
                        G[c, s : s + blk.shape[0], col : col + hi - lo] = blk
                col += hi - lo
        t_con_start = time.perf_counter()
        t_grad += t_con_start - t
        _add_gram(K, G)
        t_con += time.perf_counter() - t_con_start
        del G   # freed before the next slice's buffer is allocated (no view of it outlives this line)
    info = {"groups": len(groups), "passes": len(groups) + 1, "parameters": P, "gradient_seconds": t_grad,
            "contraction_seconds": t_con, "contraction_flops": 2.0 * C * n * n * P,
            "split_parameters": sorted({name for g in groups for name, (lo, hi) in g.items()
                                        if hi - lo < widths[name]})}
    return K, info
