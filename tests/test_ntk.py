"""Exact eNTK against a brute-force autograd loop (one backward per sample and logit)."""

import torch
import torch.nn as nn
import torchvision

import dntk
from dntk.features import GradientCapture

from conftest import brute_force_jacobian, mlp, randomize_bn, rel, small_cnn_bn


def _check_all_modes(model, x1, x2=None, **kw):
    J1 = brute_force_jacobian(model, x1)
    J2 = J1 if x2 is None else brute_force_jacobian(model, x2)
    full_ref = torch.einsum("icp,jdp->icjd", J1, J2)
    per_class_ref = torch.einsum("icp,jcp->cij", J1, J2)
    full = dntk.empirical_ntk(model, x1, x2, blocks="full", **kw)
    per_class = dntk.empirical_ntk(model, x1, x2, blocks="per_class", **kw)
    trace = dntk.empirical_ntk(model, x1, x2, blocks="trace", **kw)
    assert full.dtype == per_class.dtype == trace.dtype == torch.float64
    assert full.shape == full_ref.shape and per_class.shape == per_class_ref.shape
    # float64 end to end: agreement to 1e-6 relative is a loose bound (observed ~1e-15)
    assert rel(full, full_ref) < 1e-6
    assert rel(per_class, per_class_ref) < 1e-6
    assert rel(trace, per_class_ref.sum(0)) < 1e-6


def test_mlp_all_blocks():
    torch.manual_seed(0)
    model = mlp().double()
    x = torch.randn(7, 3, 2, 2, dtype=torch.float64)
    _check_all_modes(model, x, batch_size=3)          # symmetric, blocks mirrored across batches
    _check_all_modes(model, x, x[:4] * 0.5, batch_size=2)


def test_cnn_with_batchnorm_all_blocks():
    torch.manual_seed(1)
    model = randomize_bn(small_cnn_bn()).double()
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    _check_all_modes(model, x, batch_size=2)


def test_resnet18_all_blocks():
    torch.manual_seed(2)
    model = randomize_bn(torchvision.models.resnet18(num_classes=10)).double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    J = brute_force_jacobian(model, x)
    full = dntk.empirical_ntk(model, x, blocks="full")
    assert rel(full, torch.einsum("icp,jdp->icjd", J, J)) < 1e-6
    per_class = dntk.empirical_ntk(model, x, blocks="per_class")
    assert rel(per_class, torch.einsum("icp,jcp->cij", J, J)) < 1e-6
    trace = dntk.empirical_ntk(model, x, blocks="trace")
    assert rel(trace, torch.einsum("icp,jcp->ij", J, J)) < 1e-6


def test_training_mode_uses_running_stats_and_is_restored():
    torch.manual_seed(3)
    model = randomize_bn(small_cnn_bn()).double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    ref = dntk.empirical_ntk(model.eval(), x)
    model.train()
    got = dntk.empirical_ntk(model, x)
    assert model.training
    assert rel(got, ref) < 1e-12


class Tied(nn.Module):
    """The same Linear applied twice, plus a frozen layer that must not count."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(6, 6)
        self.frozen = nn.Linear(6, 6)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(self.frozen(x))))))


def test_tied_parameters_count_once_and_frozen_ones_not_at_all():
    torch.manual_seed(4)
    model = Tied().double()
    x = torch.randn(5, 6, dtype=torch.float64)
    J = brute_force_jacobian(model, x)  # autograd sums both uses of the tied weight
    assert J.shape[-1] == 6 * 6 + 6 + 6 * 3 + 3
    assert rel(dntk.empirical_ntk(model, x, blocks="full"), torch.einsum("icp,jdp->icjd", J, J)) < 1e-10
    assert all(p.requires_grad is False for p in model.frozen.parameters())


class GroupedAndFree(nn.Module):
    """A grouped conv and a free-standing parameter (formerly sent the whole model to vmap)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, groups=2, padding=1)
        self.scale = nn.Parameter(torch.tensor([1.5, -0.5, 2.0]))
        self.fc = nn.Linear(4 * 16, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1)) * self.scale


def test_grouped_conv_and_free_parameter_take_per_call_paths():
    torch.manual_seed(5)
    model = GroupedAndFree().double()
    x = torch.randn(4, 4, 4, 4, dtype=torch.float64)
    J = brute_force_jacobian(model, x)
    cap = GradientCapture(model)
    assert cap.backend == "ops"
    assert rel(dntk.empirical_ntk(model, x, blocks="full"), torch.einsum("icp,jdp->icjd", J, J)) < 1e-10
    r = dntk.gradient_features(model, x, "identity", progress=False)
    assert r.paths == {"conv.weight": "closed", "conv.bias": "closed", "scale": "op-vjp",
                       "fc.weight": "factored", "fc.bias": "closed"}
    assert rel(dntk.empirical_ntk(model, x, blocks="full", backend="func"), torch.einsum("icp,jdp->icjd", J, J)) < 1e-10


def test_norm_layers_and_sequence_linear():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.GroupNorm(2, 4), nn.ReLU(), nn.Flatten(2),   # [B, 4, 16]
                          nn.LayerNorm(16), nn.Linear(16, 5), nn.Flatten(), nn.Linear(20, 3)).double()
    assert GradientCapture(model).backend == "ops"
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    J = brute_force_jacobian(model, x)
    assert rel(dntk.empirical_ntk(model, x, blocks="full"), torch.einsum("icp,jdp->icjd", J, J)) < 1e-10


def test_ops_and_func_backends_agree():
    torch.manual_seed(7)
    model = randomize_bn(small_cnn_bn()).double()
    x = torch.randn(3, 3, 8, 8, dtype=torch.float64)
    a = dntk.empirical_ntk(model, x, blocks="full", backend="ops")
    b = dntk.empirical_ntk(model, x, blocks="full", backend="func")
    assert rel(a, b) < 1e-10
