"""empirical_ntk when x2's gradients exceed the memory budget: each gradient block is computed once,
spilled to disk and streamed back — the same kernel, bit for bit, as the all-in-memory path."""

import math
from collections import namedtuple

import pytest
import torch

import dntk
from dntk.errors import DNTKError
from dntk.features import ntk as ntk_module

from conftest import brute_force_jacobian, randomize_bn, rel, small_cnn_bn


@pytest.fixture
def counted(monkeypatch):
    """Count gradient passes (calls of ntk._gradients) and the inputs they cover."""
    calls = []
    real = ntk_module._gradients

    def wrapped(capture, x, classes, *rest):
        calls.append(x.shape[0])
        return real(capture, x, classes, *rest)

    monkeypatch.setattr(ntk_module, "_gradients", wrapped)
    return calls


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(4)
    model = randomize_bn(small_cnn_bn(C=3)).double().eval()
    x1 = torch.randn(7, 3, 8, 8, dtype=torch.float64)
    x2 = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    return model, x1, x2, brute_force_jacobian(model, x1), brute_force_jacobian(model, x2)


@pytest.mark.parametrize("blocks", ["per_class", "full", "trace"])
def test_spilled_kernel_equals_in_memory_and_brute_force(case, counted, tmp_path, blocks):
    model, x1, x2, J1, J2 = case
    B = 2
    in_memory = dntk.empirical_ntk(model, x1, x2, blocks=blocks, batch_size=B)
    assert len(counted) == math.ceil(7 / B) + math.ceil(5 / B)
    counted.clear()
    spilled = dntk.empirical_ntk(model, x1, x2, blocks=blocks, batch_size=B, memory_budget_bytes=0,
                                 spill_dir=tmp_path)
    # each input's gradients computed exactly once: ⌈n1/B⌉ + ⌈n2/B⌉ passes covering n1 + n2 inputs
    assert len(counted) <= math.ceil(7 / B) + math.ceil(5 / B)
    assert sum(counted) == 7 + 5
    assert torch.equal(spilled, in_memory)
    ref = {"per_class": torch.einsum("icp,jcp->cij", J1, J2), "full": torch.einsum("icp,jdp->icjd", J1, J2),
           "trace": torch.einsum("icp,jcp->ij", J1, J2)}[blocks]
    assert rel(spilled, ref) < 1e-10
    assert list(tmp_path.iterdir()) == []  # the spill folder and its files are gone


def test_symmetric_spill_and_partial_budget(case, counted, tmp_path):
    """x2 = None: one pass per block; a budget holding only some blocks keeps those, spills the rest."""
    model, x1, _, J1, _ = case
    B = 3
    in_memory = dntk.empirical_ntk(model, x1, batch_size=B)
    counted.clear()
    per_input = 3 * sum(p.numel() for p in model.parameters()) * 8  # C·P·itemsize
    for budget in (0, 3 * per_input):  # nothing kept / the first block kept
        spilled = dntk.empirical_ntk(model, x1, batch_size=B, memory_budget_bytes=budget, spill_dir=tmp_path)
        assert len(counted) == math.ceil(7 / B) and sum(counted) == 7
        counted.clear()
        assert torch.equal(spilled, in_memory)
    assert rel(in_memory, torch.einsum("icp,jcp->cij", J1, J1)) < 1e-10
    assert list(tmp_path.iterdir()) == []


def test_spill_files_are_written_and_removed(case, tmp_path, monkeypatch):
    """The spill really goes to disk (one file per x2 block) and is deleted afterwards."""
    model, x1, x2, _, _ = case
    seen = []
    real_save = torch.save

    def save(obj, path, *a, **kw):
        seen.append(path)
        return real_save(obj, path, *a, **kw)

    monkeypatch.setattr(ntk_module.torch, "save", save)
    dntk.empirical_ntk(model, x1, x2, batch_size=2, memory_budget_bytes=0, spill_dir=tmp_path)
    assert len(seen) == 3 and all(p.parent.parent == tmp_path for p in seen)
    assert not any(p.exists() for p in seen) and list(tmp_path.iterdir()) == []


def test_spill_removed_on_error(case, tmp_path, monkeypatch):
    model, x1, x2, _, _ = case

    def boom(*a, **kw):
        raise RuntimeError("contract failed")

    monkeypatch.setattr(ntk_module, "_contract", boom)
    with pytest.raises(RuntimeError, match="contract failed"):
        dntk.empirical_ntk(model, x1, x2, batch_size=2, memory_budget_bytes=0, spill_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_spill_refused_when_disk_is_too_small(case, counted, tmp_path, monkeypatch):
    model, x1, x2, _, _ = case
    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(ntk_module.shutil, "disk_usage", lambda path: Usage(10_000, 9_000, 1_000))
    with pytest.raises(DNTKError, match="GiB of disk beyond memory_budget_bytes=0.*spill_dir="):
        dntk.empirical_ntk(model, x1, x2, batch_size=2, memory_budget_bytes=0, spill_dir=tmp_path)
    assert counted == []  # refused before any gradient pass


def test_nonsense_arguments_are_refused(case, tmp_path):
    model, x1, x2, _, _ = case
    with pytest.raises(DNTKError, match="memory_budget_bytes must be an integer ≥ 0, got -1"):
        dntk.empirical_ntk(model, x1, x2, memory_budget_bytes=-1)
    with pytest.raises(DNTKError, match="batch_size must be an integer ≥ 1, got 0"):
        dntk.empirical_ntk(model, x1, x2, batch_size=0)
    with pytest.raises(DNTKError, match="is not an existing folder"):
        dntk.empirical_ntk(model, x1, x2, spill_dir=tmp_path / "missing")
