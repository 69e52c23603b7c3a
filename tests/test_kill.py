"""#28, fault tests: `dntk run` killed with SIGKILL in each stage — teacher training, WMDD, feature extraction,
stage 3 — and resumed gives the same teacher, distilled set, features and numbers, bit for bit, as a run that
was never interrupted. (Slow: two runs plus four kills, ≈ 1 min.)"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dntk.store import FeatureStore

pytestmark = pytest.mark.slow

EPOCHS = 20
ARGS = ["run", "--quiet", "--threads", "1", "--epochs", str(EPOCHS), "--train-batch-size", "16", "--distill", "wmdd",
        "--ipc", "6", "--wmdd-iterations", "60", "--gradient-distill", "local-global", "--budget", "3",
        "--feature-chunk", "8", "--n-test", "300", "--k", "128"]


def _start(out: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "dntk", *ARGS, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _epochs_done(out: Path) -> int:
    try:
        return len(json.loads((out / "teacher" / "history.json").read_text()))
    except (OSError, ValueError):
        return 0


def _kill_when(out: Path, ready, what: str) -> None:
    """Start the run, SIGKILL it the moment ready() holds, and check it was still running (killed mid-stage)."""
    proc = _start(out)
    deadline = time.monotonic() + 300
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended ({proc.returncode}) before it could be killed {what}:\n"
                                 f"{proc.stderr.read()[-2000:]}")
        assert time.monotonic() < deadline, f"never reached {what}"
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, f"the run was not running any more when killed {what}"


def _timeless(v):
    """v without its wall-clock entries (seconds, timings_s): everything else must be identical."""
    if isinstance(v, dict):
        return {k: _timeless(x) for k, x in v.items() if k not in ("seconds", "timings_s")}
    if isinstance(v, list):
        return [_timeless(x) for x in v]
    return v


def _same(a: dict, b: dict) -> None:
    for key in ("checksum", "test_accuracy", "best_epoch", "validation"):
        assert a["teacher"][key] == b["teacher"][key], key
    assert a["kernel_model"] == b["kernel_model"] and a["curves"] == b["curves"]
    assert _timeless(a["distillation"]) == _timeless(b["distillation"])
    assert _timeless(a["gradient_distillation"]) == _timeless(b["gradient_distillation"])
    assert a["gradient_distillation"]["figure3_rows"]            # the comparison is not of empty tables


def _features(out: Path, tag: str):
    (folder,) = [p for p in out.glob(f"features-{tag}-*") if p.is_dir()]
    return FeatureStore(folder).read()


def test_sigkill_in_every_stage_resumes_bit_for_bit(tmp_path):
    ref, out = tmp_path / "ref", tmp_path / "killed"
    r = subprocess.run([sys.executable, "-m", "dntk", *ARGS, "--out", str(ref)], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    _kill_when(out, lambda: 2 <= _epochs_done(out) <= EPOCHS - 3, "during teacher training")
    assert 2 <= _epochs_done(out) < EPOCHS

    def wmdd_half_done():
        done = list(out.glob("distill-*/classes/class*.pt"))
        return 2 <= len(done) <= 7 and not list(out.glob("distill-*/distilled.pt"))

    _kill_when(out, wmdd_half_done, "during WMDD")
    assert not list(out.glob("distill-*/distilled.pt"))

    def extraction_half_done():
        shards = list(out.glob("features-test-*/shard-*.json"))
        return 6 <= len(shards) <= 30

    _kill_when(out, extraction_half_done, "during feature extraction")
    assert not (out / "results.json").exists()

    def stage3_figures_started():
        return any((out / f).exists() for f in ("figure2.png", "figure3.png", "figure5.png")) and \
            not (out / "results.json").exists()

    _kill_when(out, stage3_figures_started, "during stage 3")
    assert not (out / "results.json").exists()

    r = subprocess.run([sys.executable, "-m", "dntk", *ARGS, "--out", str(out)], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (json.loads((p / "results.json").read_text()) for p in (ref, out))
    _same(a, b)
    for tag in ("train", "test"):
        fa, fb = _features(ref, tag), _features(out, tag)
        assert torch.equal(fa.features, fb.features) and torch.equal(fa.logits, fb.logits)
    (da,), (db,) = list(ref.glob("distill-*/distilled.pt")), list(out.glob("distill-*/distilled.pt"))
    assert torch.equal(torch.load(da)["images"], torch.load(db)["images"])
