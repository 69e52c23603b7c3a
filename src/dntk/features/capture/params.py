"""What a capture works on: the parameter table, the analysis mode a pass runs in, the logits it
expects, the classes it is asked for, and the refusals that come before any recording (compiled
code, random forwards)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn as nn

from ... import samples
from ...errors import DNTKError
from ...projection.base import BlockSpec

# the public names of the ways a parameter's gradient is computed (FeatureResult.paths); see the package docstring
PATHS = ("factored", "closed", "derived", "op-vjp", "func")


@dataclass
class ParameterTable:
    """The trainable parameters of a model, deduplicated (tied weights count once)."""

    names: dict[int, str]          # id(param) -> name
    params: dict[str, nn.Parameter]
    specs: list[BlockSpec]

    @property
    def num_params(self) -> int:
        return sum(s.numel for s in self.specs)


def parameter_table(model: nn.Module) -> ParameterTable:
    """Unique trainable parameters in ``model.named_parameters()`` order. Every parameter with
    two or more dimensions is a (rows = shape[0], cols = numel / rows) block for the projectors,
    whichever path its gradient takes, so the map S depends only on names and shapes."""
    names, params, specs = {}, {}, []
    for name, p in model.named_parameters():  # deduplicated by identity
        if not p.requires_grad:
            continue
        names[id(p)] = name
        params[name] = p
        factors = (p.shape[0], p.numel() // p.shape[0]) if p.dim() >= 2 and p.numel() > 0 else None
        specs.append(BlockSpec(name, p.numel(), factors))
    if not specs:
        raise DNTKError("the model has no parameters with requires_grad=True; unfreeze the parameters whose NTK you want")
    return ParameterTable(names, params, specs)


@contextmanager
def analysis_mode(model: nn.Module):
    """Eval mode for the duration of a pass (BatchNorm on running statistics); every submodule's own
    mode restored after (a model in train mode with a frozen BatchNorm in eval mode stays so)."""
    modes = [(m, m.training) for m in model.modules()]
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and not m.track_running_stats:
            raise DNTKError(
                f"BatchNorm layer {type(m).__name__} has track_running_stats=False, so each sample's output depends on the "
                "rest of its batch and per-sample gradients are not defined; build it with track_running_stats=True")
    model.eval()
    try:
        yield
    finally:
        for m, was in modes:
            m.training = was


def check_logits(out, batch: int) -> torch.Tensor:
    out = samples.logits_of(out)
    if not isinstance(out, torch.Tensor):
        raise DNTKError(f"the model returned {type(out).__name__}, not a tensor of logits [batch, C]; "
                        "wrap it so forward() returns the logits tensor")
    if out.dim() != 2 or out.shape[0] != batch:
        raise DNTKError(f"the model output has shape {tuple(out.shape)}, expected [batch={batch}, C]; "
                        "flatten or select the logits so forward() returns a 2-D tensor")
    return out


def compiled_parts(model: nn.Module) -> list[str]:
    """Names of the model's (sub)modules that are compiled, scripted or traced — torch.jit.ScriptModule
    (torch.jit.script or torch.jit.trace) and torch.compile's OptimizedModule — whose calls the op-level
    recorder cannot see; [] for a plain eager model. (A torch.fx.GraphModule is not among them: its
    generated forward is eager Python whose calls the recorder sees, and the engine handles it exactly.)"""
    kinds = [torch.jit.ScriptModule]
    try:
        from torch._dynamo.eval_frame import OptimizedModule

        kinds.append(OptimizedModule)
    except Exception:   # pragma: no cover - torch builds without dynamo
        pass
    found = []
    for name, m in model.named_modules():
        if isinstance(m, tuple(kinds)):
            found.append(f"{'the model' if not name else name} ({type(m).__name__})")
    return found


def rng_states(x) -> list:
    """The global torch generators a forward on x could draw from: the CPU one and that of every CUDA
    device holding an input (a forward that advances one of them sampled random numbers)."""
    states = [torch.random.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices = sorted({t.device.index or 0 for t in samples.leaves(x) if t.device.type == "cuda"})
        states += [torch.cuda.get_rng_state(d) for d in devices]
    return [bytes(s.numpy().tobytes()) for s in states]


def random_forward_message(evidence: str) -> str:
    return (f"the forward is random ({evidence}): dropout in training mode (e.g. F.dropout(x, training=True) — dntk "
            "puts the model in eval mode, which functional calls ignore) or random sampling (torch.randn_like, "
            "torch.rand, torch.bernoulli, ...); its per-sample gradients would be those of one random draw — call "
            "model.eval() and pass training=self.training to functional dropout, or remove the random sampling")


def resolve_classes(classes, C: int) -> list[int]:
    from ... import validate as V

    if classes is None:
        return list(range(C))
    if isinstance(classes, (str, bytes)) or not hasattr(classes, "__iter__"):
        raise DNTKError(f"classes must be None or a list of logit indices 0..{C - 1}, got {classes!r}")
    out = []
    for c in classes:
        c = V.count(c.item() if isinstance(c, torch.Tensor) and c.dim() == 0 else c, "a class index",
                    f"pass logit indices 0..{C - 1}", minimum=0)
        if not 0 <= c < C:
            raise DNTKError(f"class index {c} is out of range for a model with C={C} outputs; use 0..{C - 1}")
        out.append(c)
    if not out:
        raise DNTKError("classes is empty; pass None for all logits or a non-empty list of indices")
    return out
