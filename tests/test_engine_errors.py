"""Bad input to the engine gets a DNTKError that names the problem and the fix."""

import pytest
import torch
import torch.nn as nn

import dntk
from dntk import DNTKError
from dntk.projection import make

from conftest import mlp


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x), x


class ThreeD(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)

    def forward(self, x):
        return self.fc(x).view(-1, 2, 3)


def test_model_output_not_batch_by_classes():
    x = torch.randn(3, 4)
    with pytest.raises(DNTKError, match=r"not a tensor of logits \[batch, C\]"):
        dntk.gradient_features(TupleOut(), x, make("sjlt", k=2), progress=False)
    with pytest.raises(DNTKError, match=r"shape \(\d+, 2, 3\), expected \[batch=\d+, C\]"):
        dntk.empirical_ntk(ThreeD(), x)


def test_class_index_out_of_range():
    with pytest.raises(DNTKError, match="class index 4 is out of range .* C=4"):
        dntk.gradient_features(mlp(), torch.randn(2, 12), make("sjlt", k=8), classes=[0, 4], progress=False)


@pytest.mark.parametrize("k", [0, -3])
def test_nonpositive_k(k):
    with pytest.raises(DNTKError, match="must be positive"):
        make("sjlt", k=k)


def test_k_larger_than_parameter_count():
    with pytest.raises(DNTKError, match="larger than the number of parameters"):
        dntk.gradient_features(nn.Linear(3, 2), torch.randn(2, 3), make("gaussian", k=100), progress=False)


def test_unknown_projector_lists_valid_names():
    with pytest.raises(DNTKError, match="valid names: identity, gaussian, rademacher, sjlt, tensorsketch"):
        make("fastfood", k=8)


def test_non_finite_gradients_name_the_samples():
    x = torch.randn(6, 12)
    x[4, 0] = float("nan")
    x[1, 3] = float("inf")
    with pytest.raises(DNTKError, match=r"sample indices \[1, 4\]"):
        dntk.gradient_features(mlp(), x, make("sjlt", k=8), batch_size=8, progress=False)


def test_inputs_on_another_device():
    x = torch.empty(2, 12, device="meta")
    with pytest.raises(DNTKError, match="inputs are on meta but the model is on cpu"):
        dntk.gradient_features(mlp(), x, make("sjlt", k=8), progress=False)
    with pytest.raises(DNTKError, match="x1 is on meta but the model is on cpu"):
        dntk.empirical_ntk(mlp(), x)


def test_empty_input():
    with pytest.raises(DNTKError, match="empty"):
        dntk.gradient_features(mlp(), torch.empty(0, 12), make("sjlt", k=8), progress=False)
    with pytest.raises(DNTKError, match="empty"):
        dntk.gradient_features(mlp(), torch.utils.data.TensorDataset(torch.empty(0, 12)), make("sjlt", k=8), progress=False)
    with pytest.raises(DNTKError, match="empty"):
        dntk.empirical_ntk(mlp(), torch.empty(0, 12))


def test_batchnorm_without_running_stats():
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 2))
    with pytest.raises(DNTKError, match="track_running_stats=False"):
        dntk.empirical_ntk(model, torch.randn(3, 4))


def test_no_trainable_parameters():
    model = mlp().requires_grad_(False)
    with pytest.raises(DNTKError, match="no parameters with requires_grad=True"):
        dntk.empirical_ntk(model, torch.randn(2, 12))


def test_unknown_blocks_mode():
    with pytest.raises(DNTKError, match="per_class, full, trace"):
        dntk.empirical_ntk(mlp(), torch.randn(2, 12), blocks="diag")


def test_batch_size_zero_is_refused_not_defaulted():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    for bad in (0, -2, 1.5):
        with pytest.raises(DNTKError, match="batch_size must be an integer ≥ 1"):
            dntk.gradient_features(model, torch.randn(4, 12), "sjlt", k=4, batch_size=bad, progress=False)
