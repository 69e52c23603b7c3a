"""`dntk run` end to end on a tiny configuration of the embedded default, and its errors."""

import json
import subprocess
import sys

import pytest

from dntk.cli import main

TINY = ["--m", "30", "--n-test", "40", "--epochs", "3", "--k", "256", "--quiet"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["run", "--out", str(out), "--exact", *TINY]) == 0
    return out


def test_results_json_is_complete_and_consistent(tiny_run):
    res = json.loads((tiny_run / "results.json").read_text())
    km = res["kernel_model"]
    for key in ("fidelity", "accuracy", "mse", "condition_number", "min_eigenvalue"):
        assert isinstance(km[key], float)
    assert 0 <= km["fidelity"] <= 1 and 0 <= km["accuracy"] <= 1 and km["mse"] >= 0
    assert km["condition_number"] >= 1
    assert 0 <= res["teacher"]["test_accuracy"] <= 1
    c = res["counts"]
    assert (c["n_real"], c["m"], c["n_test"]) == (1347, 30, 40)
    assert c["per_sample_gradients"] == (30 + 40) * 10
    assert {"data", "teacher", "features_train", "features_test", "kernel_model", "exact"} <= set(res["timings_s"])
    assert res["peak_memory_mb"] > 0
    # the curve's last point is the reported model, and m grows along it
    curve = res["curves"]["projected"]
    assert curve[-1]["m"] == 30 and [r["m"] for r in curve] == sorted(r["m"] for r in curve)
    assert curve[-1]["fidelity"] == km["fidelity"]
    # exact comparison: a k=256 sketch of P≈29k parameters is close to, but not, the exact kernel
    ex = res["exact"]
    assert 0 < ex["kernel_relative_error"] < 0.5 and 0.8 < ex["kernel_alignment"] <= 1
    assert set(ex["kernel_model"]) == set(km)
    assert (tiny_run / "figure1.png").stat().st_size > 10_000


def test_rerun_resumes_from_cached_stages(tiny_run):
    teacher = tiny_run / "teacher" / "last.pt"
    feats = sorted(tiny_run.glob("features-*.pt"))
    before = [teacher.stat().st_mtime_ns] + [f.stat().st_mtime_ns for f in feats]
    first = json.loads((tiny_run / "results.json").read_text())
    assert main(["run", "--out", str(tiny_run), "--exact", *TINY]) == 0
    after = [teacher.stat().st_mtime_ns] + [f.stat().st_mtime_ns for f in feats]
    assert before == after  # nothing recomputed
    second = json.loads((tiny_run / "results.json").read_text())
    assert second["kernel_model"] == first["kernel_model"]


def test_errors_are_named(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path), "--m", "5000", "--epochs", "1", "--quiet"]) == 1
    assert "--m 5000 is larger than the training set (1347 images)" in capsys.readouterr().err
    assert main(["run", "--out", str(tmp_path), "--projector", "fjlt", "--quiet"]) == 1
    assert "valid names: identity, gaussian, rademacher, sjlt, tensorsketch" in capsys.readouterr().err
    assert main(["run", "--dataset", "folder", "--data-root", str(tmp_path / "none"), "--quiet"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["run", "--model", "vgg", "--out", str(tmp_path), "--quiet"]) == 1
    assert "valid names: resnet18, small_cnn" in capsys.readouterr().err


def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "dntk.cli", "run", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for flag in ("--dataset", "--data-root", "--model", "--checkpoint", "--image-size", "--projector", "--k", "--m",
                 "--device", "--seed", "--out", "--exact"):
        assert flag in r.stdout
