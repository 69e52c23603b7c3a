"""benchmarks/gpu_suite.py: its dry run (the device run's plan and code on the CPU at toy sizes), the pack's
round trip, the budget rule, per-stage writes of suite.json, and the slimmed POT wheel."""

import base64
import hashlib
import json
import math
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_suite  # noqa: E402


def _suite(args, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=timeout)
    return r


@pytest.fixture(scope="module")
def dry(tmp_path_factory):
    work = tmp_path_factory.mktemp("dry")
    r = _suite(["--dry-run", "--work", str(work)])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return work, json.loads((work / "out" / "suite.json").read_text())


def test_every_stage_ran_or_was_skipped_with_a_reason(dry):
    work, doc = dry
    assert doc["dry_run"] and doc["finished"] and doc["device"]["name"] == "cpu (dry run)"
    assert [s["stage"] for s in doc["stages"]] == ["cuda_tests", "zoo", "reproduce"]
    for s in doc["stages"]:
        assert s["status"] in ("ok", "skipped"), s
        if s["status"] == "skipped":
            assert s["reason"]
        else:
            assert s["seconds"] > 0 and s["estimate_s"] > 0
    assert doc["setup"]["data_ok"] and all(v["images_whose_pixel_sum_differs"] == 0 for v in doc["setup"]["verify"].values())
    tests, zoo, rep = (s.get("result", {}) for s in doc["stages"])
    # (a): every cuda-marked test collected; without CUDA every one skipped, and said so
    assert tests["tests"] == gpu_suite.count_cuda_tests() >= 7
    if not torch.cuda.is_available():
        assert tests["skipped"] == tests["tests"] and "skipped" in tests["note"]
    assert {c["test"].split("::")[-1] for c in tests["cases"]} >= {
        "test_cuda_run_matches_the_cpu_run", "test_cpu_and_cuda_agree", "test_exact_entk_on_the_gpu_matches_the_cpu",
        "test_krr_on_the_gpu_matches_the_cpu", "test_a_process_group_under_torchrun"}
    # (b): a real zoo row, timed against the vmap(grad) baseline
    (row,) = zoo["rows"]
    assert row["model"] == "resnet18" and row["device"] == "cpu" and row["P"] == 11_181_642
    assert row["ms_dntk"] > 0 and row["ms_bare"] > 0 and row["ratio"] == pytest.approx(row["ms_dntk"] / row["ms_bare"])
    assert 0 <= row["kernel_err"] < 1
    # (c): reproduce's report came back in the bundle, and unpack put it in place
    assert "report/report.md" in rep["files"] and (work / "out" / "reproduce.tar.gz").stat().st_size == rep["bytes"]
    assert rep["command"].count("--set resize=none") == 1 and "--set model=small_cnn" in rep["command"]
    assert sorted(p.name for p in (work / "out").iterdir()) == ["reproduce.tar.gz", "suite.json", "suite.log"]  # ≤ 8 files
    res = work / "results"
    assert json.loads((res / "gpu_suite.json").read_text())["unpacked"]["device"] == "cpu (dry run)"
    assert "Figure 1" in (res / "reproduce-paper160" / "report.md").read_text()
    assert (res / "reproduce-paper160" / "records" / "cost-ledger.json").exists()


def test_unpack_refuses_a_dry_run_into_benchmarks_results(dry):
    work, _ = dry
    with pytest.raises(SystemExit, match="dry run"):
        gpu_suite.unpack(work / "out")


def _flops(model, size):
    from dntk.resources import model_flops

    fl = model_flops(model, torch.zeros(1, 3, size, size))
    return fl["forward"], fl["backward_one_logit"]


def test_the_plan_is_the_formula_on_model_flops(dry):
    import torchvision

    from dntk.models import build_model

    _, doc = dry
    plan = doc["plan"]
    stages = {s["stage"]: s for s in plan["stages"]}
    R = plan["rates"]
    assert all(s["seconds"] > 0 for s in plan["stages"])
    assert plan["total_s"] == pytest.approx(sum(s["seconds"] for s in plan["stages"]))
    n_tests = stages["cuda_tests"]["tests"]
    assert n_tests == gpu_suite.count_cuda_tests() >= 7
    assert stages["cuda_tests"]["seconds"] == pytest.approx(R["PROCESS_OVERHEAD_S"] + n_tests * R["CUDA_TEST_S"])
    # zoo: resnet18 at 16 px, n = 2, C = 10
    F, B = _flops(torchvision.models.resnet18(num_classes=10).eval(), 16)
    n, C = 2, 10
    want = n * F + 2 * (F + C * B) + n * (F + C * B) + C * n * (F + B) + 8 * (F + B) + 4 * (F + 2 * B)
    (row,) = stages["zoo"]["parts"]
    assert row["flops"] == pytest.approx(want, rel=1e-12) and row["flops"] > 0
    assert row["seconds"] == pytest.approx(want / R["FP32_FLOPS_PER_S"] + R["ZOO_ROW_OVERHEAD_S"])
    # reproduce: small_cnn at 16 px; 60 train / 30 val images, 10 classes, IPC 2 (m = 20), 1 teacher epoch,
    # 2 WMDD iterations, 1 student epoch, k = 64, theory 10 images, exact subset 10 + 10
    model = build_model("small_cnn", 10, 3, 16)
    F, B = _flops(model, 16)
    P = sum(p.numel() for p in model.parameters())
    rp = stages["reproduce"]
    assert rp["forward_flops"] == F and rp["backward_one_logit_flops"] == B and rp["sizes"]["parameters"] == P
    n_tr, n_te, m, k, g = 60, 30, 20, 64, F + 10 * B
    groups = math.ceil(4 * 10 * 20 * P / int(0.05 * 2 ** 30))
    a, b, d = 10, 64, 20   # theory: min/max(n_sigma, k), subspace dimension m
    theory = 10 * (2 * a * a * b + 4 / 3 * a ** 3 + 4 * b * a * a + 8 * a ** 3
                   + 4 * (2 * (4 * k * d * d + 8 * d ** 3) + 2 * 10 * k * d + 2 * n_te * k * d))
    want = {"teacher": (1 * n_tr * 3 * F, R["TRAIN_FLOPS_PER_S"]),
            "WMDD": (2 * m * 3 * F + 2 * n_tr * F, R["FP32_FLOPS_PER_S"]),
            "student": (1 * m * 4 * F, R["TRAIN_FLOPS_PER_S"]),
            "features": (2 * (m + n_te) * g, R["FP32_FLOPS_PER_S"]),
            "theory features": ((2 * m + 10) * g, R["FP32_FLOPS_PER_S"]),
            "theory linear algebra (GPU float64)": (theory, R["GPU_F64_FLOPS_PER_S"]),
            "exact eNTK subset": (groups * 20 * g + 2 * 10 * 20 ** 2 * P + 3 * 20 * g, R["FP32_FLOPS_PER_S"])}
    parts = {p["part"]: p for p in rp["parts"]}
    for name, (flops, rate) in want.items():
        assert parts[name]["flops"] == pytest.approx(flops, rel=1e-12), name
        assert parts[name]["rate"] == rate and parts[name]["seconds"] == pytest.approx(flops / rate), name
    assert rp["seconds"] == pytest.approx(R["PROCESS_OVERHEAD_S"] + sum(p["seconds"] for p in rp["parts"]))
    assert {k_: rp["sizes"][k_] for k_ in ("n_train", "n_test", "m", "epochs", "wmdd_iterations", "student_epochs",
                                           "k", "theory_images", "exact_train", "exact_test")} == {
        "n_train": 60, "n_test": 30, "m": 20, "epochs": 1, "wmdd_iterations": 2, "student_epochs": 1, "k": 64,
        "theory_images": 10, "exact_train": 10, "exact_test": 10}
    # the full setting's plan uses the same code: paper160's own numbers
    sz = gpu_suite.reproduce_sizes("paper160", [], {}, 9469, 3925, 10, 160)
    assert (sz["epochs"], sz["wmdd_iterations"], sz["student_epochs"], sz["m"], sz["theory_images"]) == (60, 2000, 300, 500, 4000)


def test_the_pack_round_trips_to_the_library_decoding(dry):
    """What the device decodes (the library reading the unpacked .webp files) is the packed pixels, off the
    library's decoding of the source by exactly the error the manifest records."""
    from dntk.data.sources import image_folder

    work, _ = dry
    pack = work / "pack"
    man = json.loads((pack / "manifest.json").read_text())
    index = json.loads((pack / "index.json").read_text())
    assert man["format"] == "webp" and man["quality"] in gpu_suite.QUALITIES
    assert (pack / "images.bin").stat().st_size == man["images_bytes"] == sum(
        sum(index[s]["lengths"]) for s in ("train", "val"))
    whole = torch.zeros(0, dtype=torch.int64)
    for split, per in (("train", 6), ("val", 3)):
        src = image_folder(work / "toy", split, 16)
        dev = image_folder(work / "work" / "imagenette", split, 16)   # the run's unpacked tree
        rec = man["splits"][split]
        assert rec["per_class"] == [per] * 10 and rec["images"] == len(src) == len(dev)
        assert torch.equal(src.labels, dev.labels) and src.classes == dev.classes
        err = (dev.images.int() - src.images.int()).abs()
        whole = torch.cat([whole, err.flatten().long()])
        assert 0 < rec["mean_abs_error"] < 20                       # lossy, measured, and small
        assert float(err.double().mean()) == pytest.approx(rec["mean_abs_error"], rel=1e-12)
        assert int(err.max()) == rec["max_abs_error"]
        assert gpu_suite.content_digest(dev.images, dev.labels, dev.classes) == rec["packed_digest"]
        assert gpu_suite.content_digest(src.images, src.labels, src.classes) == rec["source_digest"]
        assert dev.images.long().sum(dim=(1, 2, 3)).tolist() == index[split]["sums"]
        # the packed bytes, decoded directly, are what the library reads from the files
        with open(pack / "images.bin", "rb") as f:
            f.seek(rec["offset"])
            first = f.read(index[split]["lengths"][0])
        assert torch.equal(gpu_suite.decode(first), dev.images[0])
    assert float(whole.double().mean()) == pytest.approx(man["overall"]["mean_abs_error"], rel=1e-12)


def test_a_stage_whose_estimate_exceeds_the_budget_is_skipped(tmp_path):
    r = _suite(["--dry-run", "--work", str(tmp_path), "--budget", "20", "--stages", "reproduce,zoo"])
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    doc = json.loads((tmp_path / "out" / "suite.json").read_text())
    st = {s["stage"]: s for s in doc["stages"]}
    assert st["cuda_tests"]["status"] == "skipped" and "not selected" in st["cuda_tests"]["reason"]
    rep = st["reproduce"]
    assert rep["estimate_s"] > 20 - gpu_suite.RESERVE_S                 # 15 s process start + 30 s CPU allowance
    assert rep["status"] == "skipped" and "exceeds" in rep["reason"] and "result" not in rep
    assert not (tmp_path / "work" / "report").exists() and not (tmp_path / "out" / "reproduce.tar.gz").exists()
    zoo = st["zoo"]   # 15 + 8 s: also over 20 − 15
    assert zoo["status"] == "skipped" and zoo["estimate_s"] > zoo["remaining_at_start_s"] - gpu_suite.RESERVE_S


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_the_budget_rule_in_suite(tmp_path):
    clock = Clock()
    s = gpu_suite.Suite(tmp_path, 100.0, clock=clock, log=lambda *a: None)
    ran = []

    def work(seconds):
        def fn(timeout):
            ran.append(timeout)
            clock.t += seconds
            return {"took": seconds}
        return fn

    assert s.stage("a", 50.0, work(60.0))["status"] == "ok"                  # 50 ≤ 100 − 15
    assert ran == [100.0 - gpu_suite.RESERVE_S]                              # its timeout: what is left
    rec = s.stage("b", 30.0, work(1.0))                                      # 40 left: 30 > 40 − 15
    assert rec["status"] == "skipped" and "exceeds" in rec["reason"] and len(ran) == 1
    assert s.stage("c", 20.0, work(1.0))["status"] == "ok"                   # 20 ≤ 25
    s.force = True
    assert s.stage("d", 1e6, work(1.0))["status"] == "ok"                     # --force runs it anyway


def test_a_failing_stage_leaves_the_earlier_stages_on_disk(tmp_path):
    s = gpu_suite.Suite(tmp_path, 1000.0, log=lambda *a: None)
    seen = {}

    def second(timeout):
        seen.update(json.loads((tmp_path / "suite.json").read_text()))     # what a kill here would leave
        raise RuntimeError("boom")

    def third(timeout):
        raise gpu_suite.StageFailed("2 failed", {"failed": 2})

    s.stage("first", 1.0, lambda t: {"value": 42})
    s.stage("second", 1.0, second)
    s.stage("third", 1.0, third)
    s.stage("fourth", 1.0, lambda t: {"value": 4})
    assert [(x["stage"], x["status"]) for x in seen["stages"]] == [("first", "ok"), ("second", "running")]
    assert seen["stages"][0]["result"] == {"value": 42} and not seen["finished"]
    doc = json.loads((tmp_path / "suite.json").read_text())
    st = {x["stage"]: x for x in doc["stages"]}
    assert st["first"]["result"] == {"value": 42}
    assert st["second"]["status"] == "failed" and st["second"]["error"] == "RuntimeError: boom"
    assert "raise RuntimeError" in st["second"]["traceback"]
    assert st["third"]["status"] == "failed" and st["third"]["result"] == {"failed": 2}
    assert st["fourth"]["status"] == "ok"                                    # the next stage still ran


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_run_refuses_without_cuda(tmp_path):
    r = _suite(["run", "--out", str(tmp_path)], timeout=120)
    assert r.returncode != 0 and "no CUDA device" in r.stderr and "--dry-run" in r.stderr


def _record_hash(data):
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def test_the_slim_pot_wheel(tmp_path):
    full = tmp_path / "pot-1.2.3-cp312-cp312-manylinux_2_28_x86_64.whl"
    files = {"ot/__init__.py": b"from .bsp import f\n", "ot/bsp/__init__.py": b"from .bsp_wrap import bsp_solve_c as f\n",
             "ot/bsp/bsp_wrap.cpython-312-x86_64-linux-gnu.so": os.urandom(4096), "ot/lp/emd.so": b"keep me",
             "pot-1.2.3.dist-info/METADATA": b"Metadata-Version: 2.1\nName: POT\nVersion: 1.2.3\n",
             "pot-1.2.3.dist-info/WHEEL": b"Wheel-Version: 1.0\n", "pot-1.2.3.dist-info/RECORD": b"stale"}
    with zipfile.ZipFile(full, "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
    out = gpu_suite.slim_wheel(full, tmp_path / "whl")
    assert out.name == "pot-1.2.3+nobsp-cp312-cp312-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        assert "ot/bsp/bsp_wrap.cpython-312-x86_64-linux-gnu.so" not in names and "ot/bsp/bsp_wrap.py" in names
        assert z.read("ot/lp/emd.so") == b"keep me" and not any(n.startswith("pot-1.2.3.dist-info") for n in names)
        assert b"Version: 1.2.3+nobsp\n" in z.read("pot-1.2.3+nobsp.dist-info/METADATA")
        rows = [r.split(",") for r in z.read("pot-1.2.3+nobsp.dist-info/RECORD").decode().split()]
        assert {r[0] for r in rows} == names
        for name, h, size in rows:
            if name.endswith("RECORD"):
                assert (h, size) == ("", "")
            else:
                assert h == _record_hash(z.read(name)) and int(size) == len(z.read(name))
        stub = {}
        exec(z.read("ot/bsp/bsp_wrap.py").decode(), stub)
    with pytest.raises(ImportError, match="slim POT wheel"):
        stub["bsp_solve_c"]()
