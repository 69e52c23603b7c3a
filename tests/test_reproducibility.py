"""#28, docs/reproducibility.md, line by line: what is bit-identical where, and what
results.json records so that a reader can tell two runs apart. (torchrun N × 1 process against 1 × 1:
tests/test_distributed.py::test_two_processes_write_the_same_features_as_one.)"""

from __future__ import annotations

import json

import torch

import dntk
from dntk.cli import main
from dntk.store import FeatureStore

RUN = ["run", "--quiet", "--epochs", "3", "--m", "60", "--n-test", "60", "--k", "256"]


def _results(out) -> dict:
    return json.loads((out / "results.json").read_text())


def _features(out, tag):
    (folder,) = [p for p in out.glob(f"features-{tag}-*") if p.is_dir()]
    return FeatureStore(folder).read()


def test_same_thread_count_gives_the_same_teacher_features_and_numbers(tmp_path):
    """Two runs at one thread count, in fresh folders: the same teacher (bit for bit), the same features and
    the same metrics — and results.json says which thread count that was."""
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        assert main([*RUN, "--threads", "2", "--out", str(out)]) == 0
    ra, rb = _results(a), _results(b)
    assert ra["teacher"]["checksum"] == rb["teacher"]["checksum"]
    assert ra["kernel_model"] == rb["kernel_model"] and ra["curves"] == rb["curves"]
    for tag in ("train", "test"):
        assert torch.equal(_features(a, tag).features, _features(b, tag).features)
    assert ra["environment"]["threads"] == 2 and ra["config"]["threads"] == 2


def test_features_are_bit_identical_across_thread_counts_given_one_checkpoint(tmp_path):
    """Teacher training is what differs between thread counts; with the teacher's weights given, 1 and 2
    threads give the same features bit for bit and the same metrics to rounding of the float64 solves."""
    assert main(["train", "--epochs", "2", "--quiet", "--out", str(tmp_path / "t")]) == 0
    ckpt = str(tmp_path / "t" / "teacher" / "best.pt")
    one, two = tmp_path / "one", tmp_path / "two"
    for out, threads in ((one, "1"), (two, "2")):
        assert main([*RUN, "--checkpoint", ckpt, "--threads", threads, "--out", str(out)]) == 0
    assert _results(one)["environment"]["threads"] == 1 and _results(two)["environment"]["threads"] == 2
    for tag in ("train", "test"):
        f1, f2 = _features(one, tag), _features(two, tag)
        assert torch.equal(f1.features, f2.features) and torch.equal(f1.logits, f2.logits)
    k1, k2 = _results(one)["kernel_model"], _results(two)["kernel_model"]
    for key in ("fidelity", "accuracy"):
        assert k1[key] == k2[key]
    for key in ("mse", "condition_number", "min_eigenvalue"):
        assert abs(k1[key] - k2[key]) <= 1e-10 * abs(k1[key])


def test_results_record_versions_device_threads_and_data_keys(tmp_path):
    """results.json's environment: the thread count in force, the device, dntk's and torch's versions and the
    content keys of both splits (equal to data_fingerprint of the data the run read); --threads holds for the
    run only (the caller's thread count is restored)."""
    before = torch.get_num_threads()
    out = tmp_path / "r"
    assert main([*RUN, "--threads", "1", "--out", str(out)]) == 0
    assert torch.get_num_threads() == before
    env = _results(out)["environment"]
    assert env["threads"] == 1 and env["device"] == "cpu" and env["world_size"] == 1
    assert env["torch"] == torch.__version__ and env["dntk"] == dntk.__version__
    cfg = dntk.RunConfig.from_options(n_test=60).resolved()
    train, test = dntk.data.load_configured(cfg.data, progress=False)
    from dntk.training.teacher import data_fingerprint

    assert env["data"] == {"train": data_fingerprint(train), "test": data_fingerprint(test)}
    assert env["data"]["train"] != env["data"]["test"]


def test_a_store_resumed_at_another_thread_count_says_so(tmp_path, capsys):
    """Each shard records the threads, device and world it was computed with; results.json keeps them per
    store (environment.features_computed_with) and the run warns when a resumed extraction mixed thread
    counts. The mixed store still holds features equal to one run's (bit for bit for this small CNN)."""
    assert main(["train", "--epochs", "2", "--quiet", "--out", str(tmp_path / "t")]) == 0
    ckpt = str(tmp_path / "t" / "teacher" / "best.pt")
    out = tmp_path / "r"
    args = [*RUN[:1], *RUN[2:], "--checkpoint", ckpt, "--feature-chunk", "16", "--out", str(out)]
    assert main([*args, "--threads", "1", "--quiet"]) == 0
    assert _results(out)["environment"]["features_computed_with"]["train"] == {"threads": [1], "device": ["cpu"],
                                                                               "world": [1]}
    ref = _features(out, "train").features.clone()
    (folder,) = [p for p in out.glob("features-train-*") if p.is_dir()]
    for f in folder.glob("shard-000000.*"):   # as if the first run had stopped before this shard
        f.unlink()
    capsys.readouterr()
    assert main([*args, "--threads", "2"]) == 0
    assert _results(out)["environment"]["features_computed_with"]["train"]["threads"] == [1, 2]
    assert "computed under several threads settings" in capsys.readouterr().out
    assert torch.equal(_features(out, "train").features, ref)
