"""Past one process: the sharded feature store, torchrun extraction (2 CPU processes, gloo) against one
process, resume after a lost shard, `dntk store verify`, and streamed evaluation."""

import json
import os
import subprocess
import sys

import pytest
import torch

from dntk.cli import main
from dntk.store import FeatureStore

RUN = ["run", "--quiet", "--n-test", "50", "--k", "128", "--feature-chunk", "16"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return env


def _dntk(args, procs=1, check=True):
    """`dntk ...` in fresh processes with one thread each (torchrun's default), so the per-process
    arithmetic is the same whatever the number of processes."""
    if procs == 1:
        cmd = [sys.executable, "-m", "dntk", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
               "-m", "dntk", *args]
    r = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    assert main(["train", "--epochs", "2", "--out", str(out), "--quiet"]) == 0
    return str(out / "teacher" / "best.pt")


def _store(out, tag):
    (folder,) = [p for p in out.glob(f"features-{tag}-*") if p.is_dir()]
    return FeatureStore(folder)


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory, teacher):
    a, b = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    args = [*RUN, "--checkpoint", teacher, "--train-points", "60"]
    _dntk([*args, "--out", str(a)])
    _dntk([*args, "--out", str(b)], procs=2)
    return a, b


def test_two_processes_write_the_same_features_as_one(one_and_two):
    a, b = one_and_two
    for tag in ("train", "test"):
        sa, sb = _store(a, tag), _store(b, tag)
        assert sa.verify()["complete"] and sb.verify()["complete"]
        fa, fb = sa.read(), sb.read()
        assert len(fa) == (60 if tag == "train" else 50)
        assert torch.equal(fa.features, fb.features) and torch.equal(fa.logits, fb.logits)
    # the two processes split the work: shard i was written by rank i mod 2
    ranks = {json.loads(r.read_text())["rank"] for r in _store(b, "test").folder.glob("shard-*.json")}
    assert ranks == {0, 1}
    ra, rb = (json.loads((p / "results.json").read_text()) for p in (a, b))
    assert ra["kernel_model"] == rb["kernel_model"] and ra["curves"] == rb["curves"]
    assert ra["teacher"]["checksum"] == rb["teacher"]["checksum"]


def test_a_lost_shard_is_recomputed_alone(one_and_two, teacher):
    """An interrupted rank leaves shards without their completion record: the rerun computes those only."""
    _, b = one_and_two
    train = _store(b, "train")
    lost = train.folder / "shard-000001.json"
    lost.unlink()
    (train.folder / "shard-000001.features.npy").write_bytes(b"torn")  # a half-written array
    stamps = {p: p.stat().st_mtime_ns for p in train.folder.glob("shard-*.json")}
    assert train.missing() == [1]
    before = json.loads((b / "results.json").read_text())
    _dntk([*RUN, "--checkpoint", teacher, "--train-points", "60", "--out", str(b)], procs=2)
    assert lost.exists() and all(p.stat().st_mtime_ns == t for p, t in stamps.items())
    after = json.loads((b / "results.json").read_text())
    assert after["kernel_model"] == before["kernel_model"]


def test_store_verify_names_missing_and_corrupt_shards(one_and_two, capsys, tmp_path):
    import shutil

    a, _ = one_and_two
    test = FeatureStore(shutil.copytree(_store(a, "test").folder, tmp_path / "copy"))  # the fixture stays intact
    assert main(["store", "verify", str(test.folder)]) == 0
    assert "50 samples in 4 shards, 4 complete and intact" in capsys.readouterr().out
    (test.folder / "shard-000002.json").unlink()
    arr = test.folder / "shard-000003.logits.npy"
    data = bytearray(arr.read_bytes())
    data[-1] ^= 0xFF
    arr.write_bytes(bytes(data))
    assert main(["store", "verify", str(test.folder)]) == 1
    out = capsys.readouterr()
    assert "missing shards: [2]" in out.out and "corrupt: shard 3 shard-000003.logits.npy: checksum differs" in out.out
    assert "is incomplete" in out.err
    # a shard copied over another (right sizes, wrong range) is not taken for it
    for src in test.folder.glob("shard-000000.*"):
        shutil.copy(src, test.folder / src.name.replace("000000", "000001"))
    assert FeatureStore(test.folder).verify()["missing"] == [1, 2]
    # a folder that is not a store is refused by name
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "manifest.json").write_text('{"a": 1}')
    assert main(["store", "verify", str(tmp_path / "other")]) == 1
    assert "is not a dntk feature-store manifest" in capsys.readouterr().err


def test_streamed_evaluation_equals_stored_and_keeps_no_test_features(one_and_two, teacher, tmp_path):
    a, _ = one_and_two
    out = tmp_path / "stream"
    _dntk([*RUN, "--checkpoint", teacher, "--train-points", "60", "--out", str(out), "--test-features", "stream"],
          procs=2)
    assert not list(out.glob("features-test-*"))
    stored, streamed = (json.loads((p / "results.json").read_text()) for p in (a, out))
    for r1, r2 in zip(stored["curves"]["projected"], streamed["curves"]["projected"]):
        assert r1["m"] == r2["m"] and r1["fidelity"] == r2["fidelity"] and r1["accuracy"] == r2["accuracy"]
        # predictions φ(x)ᵀ(Φᵀα/ν) instead of (φ(x)Φᵀ/ν)α: the same numbers up to float64 rounding
        assert r2["mse"] == pytest.approx(r1["mse"], rel=1e-9)
        assert r2["condition_number"] == pytest.approx(r1["condition_number"], rel=1e-9)


def test_store_refuses_another_extraction_in_its_folder(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    from dntk.projection import make

    X = torch.randn(10, 1, 4, 4)
    fs = FeatureStore(tmp_path, shard=4)
    fs.extract(model, X, make("sjlt", k=8, seed=0), progress=False)
    with pytest.raises(Exception, match="holds another extraction .*identity"):
        FeatureStore(tmp_path, shard=4).extract(model, X + 1, make("sjlt", k=8, seed=0), progress=False)
    with pytest.raises(Exception, match="holds another extraction .*shard_size"):
        FeatureStore(tmp_path, shard=5).extract(model, X, make("sjlt", k=8, seed=0), progress=False)
    r = FeatureStore(tmp_path).read(3, 9)
    assert len(r) == 6 and torch.equal(FeatureStore(tmp_path).read_class(2, 3, 9), r.features[2])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_run_matches_the_cpu_run(teacher, tmp_path):
    """`dntk run --device cuda` (teacher, features, KRR solves on the GPU) against the CPU run."""
    args = [*RUN, "--checkpoint", teacher, "--train-points", "60", "--exact"]
    assert main([*args, "--out", str(tmp_path / "cpu")]) == 0
    assert main([*args, "--out", str(tmp_path / "gpu"), "--device", "cuda"]) == 0
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("cpu", "gpu"))
    fa, fb = _store(tmp_path / "cpu", "test").read(), _store(tmp_path / "gpu", "test").read()
    assert ((fa.features - fb.features).norm() / fa.features.norm()) < 1e-4  # float32 engine, other kernels
    for key in ("mse", "condition_number"):
        assert b["kernel_model"][key] == pytest.approx(a["kernel_model"][key], rel=1e-3)
    assert abs(b["kernel_model"]["fidelity"] - a["kernel_model"]["fidelity"]) <= 0.04  # ≤ 2 of 50 argmax ties
    assert b["exact"]["kernel_relative_error"] == pytest.approx(a["exact"]["kernel_relative_error"], rel=1e-3)
