"""Per-sample, per-logit parameter gradients, one parameter block at a time.

How the hook backend works (and why it is fast on CPUs): one forward pass over a batch records, for
every Linear / Conv2d / norm layer, the quantity its weight gradient is built from (the layer input,
unfolded into patches for Conv2d, or the normalised input for norms) and keeps the layer's output as
a leaf of the backward. Then, for each logit c, a single backward of Σ_b f_c(x_b) *to the layer
outputs only* gives g_b = ∂f_c(x_b)/∂out_b for every sample at once — in eval mode the samples do
not interact, so the gradient of the sum is the per-sample gradient. The per-sample weight gradient
is Σ_t g_b[:, t] a_b[:, t]ᵀ; it is handed to a *sink* as these two factors, so a projector can sketch
it without ever forming it (see :mod:`dntk.projection`). Parameters are frozen during the pass so
autograd never builds the summed weight gradients it would otherwise compute.

Two details keep it exact:
- layer outputs are cloned inside the forward hook, so in-place operations later in the network
  (``relu(inplace=True)``, ``out += identity``) cannot change the tensor we differentiate against;
- the recorded inputs are fresh tensors (patches, normalised inputs) made at hook time.

Models with trainable parameters in other module types (embeddings, custom parameters, grouped
convolutions, ...) use the generic ``torch.func`` backend (``vmap(jacrev)``), which is slower but
handles any differentiable model.

BatchNorm: the model is put in eval mode for the pass (running statistics; restored afterwards), so
a model in training mode is analysed as it would predict. A BatchNorm layer without running
statistics couples the samples of a batch and is rejected.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import DNTKError
from ..projection.base import BlockSpec

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


@dataclass
class ParameterTable:
    """The trainable parameters of a model, deduplicated (tied weights count once)."""

    names: dict[int, str]          # id(param) -> name
    params: dict[str, nn.Parameter]
    specs: list[BlockSpec]

    @property
    def num_params(self) -> int:
        return sum(s.numel for s in self.specs)


def _factors(module: nn.Module, pname: str):
    if pname != "weight":
        return None
    if isinstance(module, nn.Linear):
        return (module.out_features, module.in_features)
    if isinstance(module, nn.Conv2d) and _conv_supported(module):
        w = module.weight
        return (w.shape[0], w[0].numel())
    return None


def _conv_supported(m: nn.Conv2d) -> bool:
    return m.groups == 1 and m.padding_mode == "zeros" and not isinstance(m.padding, str)


def _module_supported(m: nn.Module) -> bool:
    if isinstance(m, nn.Linear):
        return True
    if isinstance(m, nn.Conv2d):
        return _conv_supported(m)
    if isinstance(m, _NORMS):
        return True
    return False


def parameter_table(model: nn.Module) -> ParameterTable:
    names, params, specs = {}, {}, []
    owner = {}
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            owner.setdefault(id(p), (module, pname))
    for name, p in model.named_parameters():  # deduplicated by identity
        if not p.requires_grad:
            continue
        names[id(p)] = name
        params[name] = p
        module, pname = owner[id(p)]
        specs.append(BlockSpec(name, p.numel(), _factors(module, pname)))
    if not specs:
        raise DNTKError("the model has no parameters with requires_grad=True; unfreeze the parameters whose NTK you want")
    return ParameterTable(names, params, specs)


def hooks_supported(model: nn.Module, table: ParameterTable) -> bool:
    """True when every trainable parameter lives directly in a module the hook backend handles."""
    covered = set()
    for module in model.modules():
        own = [p for _, p in module.named_parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if not _module_supported(module):
            return False
        covered.update(id(p) for p in own)
    return covered == set(table.names)


@contextmanager
def analysis_mode(model: nn.Module, table: ParameterTable, freeze: bool):
    """Eval mode and (optionally) frozen parameters for the duration of a pass; restored after."""
    was_training = model.training
    flags = [(p, p.requires_grad) for p in table.params.values()]
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats:
            raise DNTKError(
                f"BatchNorm layer {type(m).__name__} has track_running_stats=False, so each sample's output depends on the "
                "rest of its batch and per-sample gradients are not defined; build it with track_running_stats=True")
    model.eval()
    try:
        if freeze:
            for p, _ in flags:
                p.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        model.train(was_training)


def check_logits(out, batch: int) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise DNTKError(f"the model returned {type(out).__name__}, not a tensor of logits [batch, C]; "
                        "wrap it so forward() returns the logits tensor")
    if out.dim() != 2 or out.shape[0] != batch:
        raise DNTKError(f"the model output has shape {tuple(out.shape)}, expected [batch={batch}, C]; "
                        "flatten or select the logits so forward() returns a 2-D tensor")
    return out


class _Record:
    __slots__ = ("module", "kind", "a", "out")

    def __init__(self, module, kind, a, out):
        self.module, self.kind, self.a, self.out = module, kind, a, out


def _make_hook(records: list):
    def hook(module, inputs, output):
        x = inputs[0]
        B = x.shape[0]
        if isinstance(module, nn.Linear):
            a = x.detach().reshape(B, -1, module.in_features).transpose(1, 2).contiguous()  # [B, in, T]
            kind = "linear"
        elif isinstance(module, nn.Conv2d):
            a = F.unfold(x.detach(), module.kernel_size, dilation=module.dilation,
                         padding=module.padding, stride=module.stride)  # [B, in·kh·kw, T]
            kind = "conv"
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            shape = [1, -1] + [1] * (x.dim() - 2)
            a = (x.detach() - module.running_mean.view(shape)) * torch.rsqrt(module.running_var.view(shape) + module.eps)
            kind = "channel"
        elif isinstance(module, nn.GroupNorm):
            a = F.group_norm(x.detach(), module.num_groups, None, None, module.eps)
            kind = "channel"
        elif isinstance(module, nn.LayerNorm):
            a = F.layer_norm(x.detach(), module.normalized_shape, None, None, module.eps)
            kind = "layernorm"
        else:  # pragma: no cover - filtered by hooks_supported
            return None
        out = output.clone()
        records.append(_Record(module, kind, a, output))
        return out

    return hook


class GradientCapture:
    """Computes per-sample, per-logit gradients of one batch and feeds them to a sink.

    Sink protocol (any object with these two methods):
        ``block(c, name, block[B, numel])`` — a materialised per-sample gradient block;
        ``outer(c, name, g[B, rows, T], a[B, cols, T])`` — a weight gradient Σ_t g_t a_tᵀ in factors.
    ``c`` is the position of the logit in ``classes``.
    """

    def __init__(self, model: nn.Module, backend: str = "auto"):
        self.model = model
        self.table = parameter_table(model)
        supported = hooks_supported(model, self.table)
        if backend == "auto":
            backend = "hooks" if supported else "func"
        if backend == "hooks" and not supported:
            raise DNTKError("backend='hooks' needs every trainable parameter in a Linear, Conv2d (groups=1, zero padding) "
                            "or norm layer; use backend='func' (generic, slower)")
        if backend not in ("hooks", "func"):
            raise DNTKError(f"unknown backend {backend!r}; use 'auto', 'hooks' or 'func'")
        self.backend = backend

    @property
    def specs(self) -> list[BlockSpec]:
        return self.table.specs

    def run(self, x: torch.Tensor, classes: list[int] | None, sink) -> torch.Tensor:
        """Feed the gradients of batch x [B, ...] to ``sink``; return the logits [B, C] (detached)."""
        if self.backend == "hooks":
            return self._run_hooks(x, classes, sink)
        return self._run_func(x, classes, sink)

    # -- hook backend ------------------------------------------------------------------------------
    def _run_hooks(self, x, classes, sink):
        model, table = self.model, self.table
        records: list[_Record] = []
        handles = [m.register_forward_hook(_make_hook(records))
                   for m in model.modules()
                   if _module_supported(m) and any(p.requires_grad for p in m.parameters(recurse=False))]
        try:
            with analysis_mode(model, table, freeze=True), torch.enable_grad():
                xin = x.detach().requires_grad_(x.is_floating_point())
                logits = check_logits(model(xin), x.shape[0])
        finally:
            for h in handles:
                h.remove()
        classes = _resolve_classes(classes, logits.shape[1])
        outs = [r.out for r in records]
        B = x.shape[0]
        for ci, c in enumerate(classes):
            grads = torch.autograd.grad(logits[:, c].sum(), outs, retain_graph=ci < len(classes) - 1, allow_unused=True)
            for rec, g in zip(records, grads):
                if g is None:
                    g = torch.zeros_like(rec.out)
                self._emit(ci, rec, g, B, sink)
        return logits.detach()

    def _emit(self, ci, rec, g, B, sink):
        m, names = rec.module, self.table.names
        w, b = m.weight, getattr(m, "bias", None)
        if rec.kind in ("linear", "conv"):
            rows = w.shape[0]
            if rec.kind == "linear":
                gf = g.reshape(B, -1, rows).transpose(1, 2)  # [B, out, T]
            else:
                gf = g.reshape(B, rows, -1)
            if w.requires_grad and id(w) in names:
                sink.outer(ci, names[id(w)], gf, rec.a)
            if b is not None and b.requires_grad and id(b) in names:
                sink.block(ci, names[id(b)], gf.sum(-1))
            return
        if rec.kind == "channel":
            gw = (g * rec.a).reshape(B, g.shape[1], -1).sum(-1)  # affine is per channel (dim 1)
            gb = g.reshape(B, g.shape[1], -1).sum(-1)
        else:  # layernorm: affine over the trailing normalized_shape
            nd = len(m.normalized_shape)
            lead = g.dim() - nd
            dims = list(range(1, lead))
            gw = (g * rec.a).sum(dims) if dims else g * rec.a
            gb = g.sum(dims) if dims else g
            gw, gb = gw.reshape(B, -1), gb.reshape(B, -1)
        if w is not None and w.requires_grad and id(w) in names:
            sink.block(ci, names[id(w)], gw.reshape(B, -1))
        if b is not None and b.requires_grad and id(b) in names:
            sink.block(ci, names[id(b)], gb.reshape(B, -1))

    # -- generic torch.func backend ----------------------------------------------------------------
    def _run_func(self, x, classes, sink):
        from torch.func import functional_call, jacrev, vmap

        model, table = self.model, self.table
        with analysis_mode(model, table, freeze=False):
            with torch.no_grad():
                logits = check_logits(model(x), x.shape[0])
            classes_r = _resolve_classes(classes, logits.shape[1])
            params = {n: p.detach() for n, p in table.params.items()}
            idx = torch.tensor(classes_r, device=x.device)

            def f(p, xi):
                return functional_call(model, p, (xi.unsqueeze(0),), strict=False).squeeze(0).index_select(0, idx)

            jac = vmap(jacrev(f), in_dims=(None, 0))(params, x)  # name -> [B, C', *shape]
        B = x.shape[0]
        for ci in range(len(classes_r)):
            for spec in table.specs:
                sink.block(ci, spec.name, jac[spec.name][:, ci].reshape(B, -1))
        return logits.detach()


def _resolve_classes(classes, C: int) -> list[int]:
    if classes is None:
        return list(range(C))
    out = []
    for c in classes:
        c = int(c)
        if not 0 <= c < C:
            raise DNTKError(f"class index {c} is out of range for a model with C={C} outputs; use 0..{C - 1}")
        out.append(c)
    if not out:
        raise DNTKError("classes is empty; pass None for all logits or a non-empty list of indices")
    return out
