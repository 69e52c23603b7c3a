"""Shared models, data and the brute-force autograd reference the tests compare against."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn

# the data-dependent tests read DNTK_DATA (default ../shared/data beside the repository): a folder holding the
# ImageFolder tree imagenette2-224-sample (train/ and val/); without it they skip and say where they looked
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARED_DATA = Path(os.environ.get("DNTK_DATA") or DEFAULT_DATA)
SAMPLE = SHARED_DATA / "imagenette2-224-sample"


def brute_force_jacobian(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """J[i, c, :] = ∇θ f_c(x_i), one backward per sample and logit, eval mode, over the unique
    parameters with requires_grad — the independent reference for every NTK test."""
    was = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(x.shape[0]):
        out = model(x[i : i + 1])[0]
        per_logit = []
        for c in range(out.shape[0]):
            grads = torch.autograd.grad(out[c], params, retain_graph=True, allow_unused=True)
            per_logit.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1)
                                        for g, p in zip(grads, params)]))
        rows.append(torch.stack(per_logit))
    model.train(was)
    return torch.stack(rows).detach()


def projected_reference(J: torch.Tensor, specs, projector) -> torch.Tensor:
    """φ = Sᵀ∇f from brute-force gradients J [n, C, P] through the projector's materialised path
    (Projector.project on each parameter's block) — independent of the factored/FFT paths."""
    n, C, _ = J.shape
    out = torch.zeros(n * C, projector.dim, dtype=torch.float64)
    off = 0
    for s in specs:
        projector.project(s.name, J[:, :, off: off + s.numel].reshape(n * C, -1), out)
        off += s.numel
    return out.reshape(n, C, -1).transpose(0, 1)  # [C, n, k]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def mlp(C=4):
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, C))


def small_cnn_bn(C=5):
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(inplace=True),
        nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, C))


def randomize_bn(model: nn.Module, seed=0):
    """Give BatchNorm layers non-trivial running statistics and affines so they matter."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


@pytest.fixture
def sample_root():
    if not SAMPLE.exists():
        where = f"DNTK_DATA={os.environ['DNTK_DATA']}" if os.environ.get("DNTK_DATA") else f"the default {DEFAULT_DATA}"
        pytest.skip(f"needs the ImageNette sample: {SAMPLE} does not exist ({where}); set DNTK_DATA to the folder "
                    "that holds imagenette2-224-sample/")
    return SAMPLE


@pytest.fixture
def captures(monkeypatch):
    """Every GradientCapture made during the test, to read its counters."""
    made = []
    from dntk.features import capture as cap

    real = cap.GradientCapture.__init__

    def init(self, *a, **k):
        real(self, *a, **k)
        made.append(self)

    monkeypatch.setattr(cap.GradientCapture, "__init__", init)
    return made
