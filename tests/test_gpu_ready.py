"""What keeps a GPU busy in feature extraction, checked on the CPU: non-finite samples refused after the
batch loop (one read-back) with the same message, and the feature store's shards written by a writer
thread while the next shard is computed — with the same files, and a failed write never recorded."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.nn as nn

import dntk
from dntk.errors import DNTKError
from dntk.store import FeatureStore


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def test_nonfinite_samples_are_named_after_the_loop():
    """NaN in samples 5 and 11 (different batches): one refusal naming both global indices — not only the
    first batch's, as a per-batch check would."""
    X = torch.randn(16, 5)
    X[5, 0] = float("nan")
    X[11, 2] = float("inf")
    with pytest.raises(DNTKError, match=r"sample indices \[5, 11\]"):
        dntk.gradient_features(_mlp(), X, dntk.projection.make("identity"), progress=False, batch_size=4)


def test_shards_are_written_by_the_writer_thread(tmp_path, monkeypatch):
    """4 shards: each written on the writer thread, the next shard's features computed meanwhile (its
    extraction starts before the previous write returns), and the store reads back exactly what
    gradient_features computes in one call."""
    model, X = _mlp(), torch.randn(20, 5)
    proj = dntk.projection.make("sjlt", k=8, seed=0)
    events = []
    real_write = FeatureStore._write_shard
    real_features = dntk.features.gradient_features
    gate = threading.Event()

    def write(self, i, *a, **k):
        events.append(("write", i, threading.current_thread().name))
        if i == 0:
            gate.wait(timeout=5)   # hold shard 0's write until shard 1's features are being computed
        out = real_write(self, i, *a, **k)
        events.append(("written", i, threading.current_thread().name))
        return out

    def features(*a, **k):
        events.append(("compute", None, threading.current_thread().name))
        if sum(e[0] == "compute" for e in events) == 2:
            gate.set()
        return real_features(*a, **k)

    monkeypatch.setattr(FeatureStore, "_write_shard", write)
    monkeypatch.setattr(dntk.features, "gradient_features", features)
    store = FeatureStore(tmp_path / "s", shard=5)
    assert store.extract(model, X, proj, progress=False) == [0, 1, 2, 3]
    writes = [e for e in events if e[0] == "write"]
    assert [w[1] for w in writes] == [0, 1, 2, 3]
    assert all(w[2].startswith("dntk-shard-writer") for w in writes)
    computes = [j for j, e in enumerate(events) if e[0] == "compute"]
    assert gate.is_set() and computes[1] < events.index(("written", 0, writes[0][2]))   # overlapped
    got = FeatureStore(tmp_path / "s").read()
    parts = [real_features(model, X[s:s + 5], proj, progress=False) for s in range(0, 20, 5)]   # shard by shard
    assert torch.equal(got.features, torch.cat([p.features for p in parts], 1))
    assert torch.equal(got.logits, torch.cat([p.logits for p in parts]))


def test_a_failed_shard_write_is_raised_and_never_recorded(tmp_path, monkeypatch):
    """The writer thread's error reaches the caller; the shards written before it stay complete, the failed
    one has no record, and a rerun computes only that one and the rest."""
    model, X = _mlp(), torch.randn(15, 5)
    proj = dntk.projection.make("sjlt", k=8, seed=0)
    real_write = FeatureStore._write_shard

    def failing(self, i, *a, **k):
        if i == 1:
            raise OSError("disk full (simulated)")
        return real_write(self, i, *a, **k)

    monkeypatch.setattr(FeatureStore, "_write_shard", failing)
    with pytest.raises(OSError, match="disk full"):
        FeatureStore(tmp_path / "s", shard=5).extract(model, X, proj, progress=False)
    store = FeatureStore(tmp_path / "s", shard=5)
    assert store.missing(15) == [1, 2]   # shard 2 is computed but its write never starts after the error
    monkeypatch.setattr(FeatureStore, "_write_shard", real_write)
    again = FeatureStore(tmp_path / "s", shard=5).extract(model, X, proj, progress=False)
    assert 0 not in again and 1 in again
    ref = torch.cat([dntk.gradient_features(model, X[s:s + 5], proj, progress=False).features for s in (0, 5, 10)], 1)
    assert torch.equal(FeatureStore(tmp_path / "s").read().features, ref)


def test_sliced_kernels_default_budget_and_refusals():
    """memory_budget_bytes=None: 4 GiB off CUDA (half the free memory on CUDA, exercised by the CUDA
    tests), the same kernel as an explicit budget; a zero or boolean budget is still refused."""
    from dntk.features.sliced import default_gradient_budget, sliced_class_kernels

    assert default_gradient_budget("cpu") == 4 << 30
    model, X = _mlp().double(), torch.randn(6, 5, dtype=torch.float64)
    K_default, _ = sliced_class_kernels(model, X)
    K_small, info = sliced_class_kernels(model, X, memory_budget_bytes=8 * 3 * 6 * 10)   # 10 elements a slice
    assert info["groups"] > 1 and torch.allclose(K_default, K_small, rtol=1e-12, atol=1e-14)
    for bad in (0, True):
        with pytest.raises(DNTKError, match="memory_budget_bytes"):
            sliced_class_kernels(model, X, memory_budget_bytes=bad)


def test_a_wmdd_step_reads_nothing_back(monkeypatch):
    """WMDD's optimisation loop keeps its loss parts on the device (grouped_objective(lazy=True)) and reads
    them once at the end: every call of a step's objective is watched for read-backs (none), while the
    records still carry the first step's losses, equal to the eager objective's."""
    from test_train_pipeline import SyncCounter

    from dntk.distill import WMDDConfig, bn_layers
    import importlib

    W = importlib.import_module("dntk.distill.wmdd")   # the module (dntk.distill.wmdd is also the function's name)
    from dntk.models import build_model

    torch.manual_seed(0)
    teacher = build_model("resnet18", 3, 3, 8, stem="small").eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    layers = bn_layers(teacher)
    cfg = WMDDConfig(ipc=2, iterations=3, jitter=False)
    init = torch.randn(4, 3, 8, 8)
    supports = torch.randn(2, 2, 512)
    stats = [[(torch.zeros(l.num_features), torch.ones(l.num_features)) for l in layers] for _ in range(2)]
    seen = []
    real = W.grouped_objective

    def watched(*a, **k):
        if not k.get("lazy"):
            return real(*a, **k)
        with SyncCounter() as c:
            out = real(*a, **k)
        seen.append(c.seen)
        return out

    monkeypatch.setattr(W, "grouped_objective", watched)
    _, recs = W.optimise_group(teacher, init, [0, 1], supports, stats, cfg, layers)
    assert len(seen) == 3 and all(s == [] for s in seen), seen
    _, eager = real(teacher, init, [0, 1], supports, W.stack_bn_targets(stats, "cpu"), cfg, layers)
    assert [r["initial_loss"] for r in recs] == pytest.approx(eager, rel=1e-6)


def test_a_failed_write_of_the_last_shard_is_raised(tmp_path, monkeypatch):
    """The last shard's write fails after the loop has ended: extract still raises (the final wait on the
    writer), and that shard is left unrecorded."""
    model, X = _mlp(), torch.randn(15, 5)
    proj = dntk.projection.make("sjlt", k=8, seed=0)
    real_write = FeatureStore._write_shard

    def failing(self, i, *a, **k):
        if i == 2:
            raise OSError("disk full on the last shard (simulated)")
        return real_write(self, i, *a, **k)

    monkeypatch.setattr(FeatureStore, "_write_shard", failing)
    with pytest.raises(OSError, match="last shard"):
        FeatureStore(tmp_path / "s", shard=5).extract(model, X, proj, progress=False)
    assert FeatureStore(tmp_path / "s", shard=5).missing(15) == [2]


def test_wmdd_under_bf16_autocast_moves_the_images_like_float32():
    """precision='bf16' (the GPU option) runs the same steps under bf16 autocast — here on the CPU: the images
    move, the records are finite float32 losses, the result is within bf16's rounding of the float32 run's
    path (relative difference < 5%), and the settings key of a float32 run is what it was before the field."""
    import importlib
    from dataclasses import replace as dc_replace

    from dntk.distill import WMDDConfig, bn_layers
    from dntk.models import build_model

    W = importlib.import_module("dntk.distill.wmdd")
    torch.manual_seed(0)
    teacher = build_model("resnet18", 3, 3, 8, stem="small").eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    layers = bn_layers(teacher)
    init = torch.randn(4, 3, 8, 8)
    supports = torch.randn(2, 2, 512)
    stats = [[(torch.zeros(l.num_features), torch.ones(l.num_features)) for l in layers] for _ in range(2)]
    cfg = WMDDConfig(ipc=2, iterations=4, jitter=False, lr=0.01)
    x32, _ = W.optimise_group(teacher, init, [0, 1], supports, stats, cfg, layers)
    x16, recs = W.optimise_group(teacher, init, [0, 1], supports, stats, dc_replace(cfg, precision="bf16"), layers)
    assert x16.dtype == torch.float32 and not torch.equal(x16, init)
    assert ((x16 - init).norm() - (x32 - init).norm()).abs() < 0.05 * (x32 - init).norm()
    assert all(isinstance(r["final_loss"]["total"], float) and r["final_loss"]["total"] == r["final_loss"]["total"]
               for r in recs)
    assert "precision" not in W._settings(cfg) and W._settings(dc_replace(cfg, precision="bf16"))["precision"] == "bf16"
    with pytest.raises(DNTKError, match="unknown WMDD precision"):
        W.optimise_group(teacher, init, [0, 1], supports, stats, dc_replace(cfg, precision="fp8"), layers)
