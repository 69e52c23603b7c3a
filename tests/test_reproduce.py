"""`dntk reproduce` and its parts: the sliced exact eNTK, the theory diagnostics, the cost formulas,
the per-stage memory, the report — each against an independent reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from conftest import brute_force_jacobian, randomize_bn, small_cnn_bn
from dntk.cli import main
from dntk.errors import DNTKError
from dntk.features import empirical_ntk, sliced_class_kernels
from dntk.features.sliced import plan_parameter_slices
from dntk.kernels import compare_with_exact
from dntk.resources import StageTimer, exact_entk_cost, model_flops
from dntk.spectral import subspace_diagnostics


# --- the exact eNTK by parameter slices ---------------------------------------------------------------------
def test_sliced_kernels_equal_brute_force_and_split_parameters():
    torch.manual_seed(0)
    model = randomize_bn(small_cnn_bn(C=4)).eval()
    x = torch.randn(7, 3, 8, 8)
    n, C = 7, 4
    P = sum(p.numel() for p in model.parameters())
    budget = 4 * C * n * (P // 5)                      # about five slices: parameters must be cut
    K, info = sliced_class_kernels(model, x, memory_budget_bytes=budget, batch_size=3)
    assert info["groups"] >= 5 and info["split_parameters"], info     # the sliced path, with cut tensors
    assert info["parameters"] == P
    J = brute_force_jacobian(model, x).double()        # [n, C, P], one backward per sample and logit
    ref = torch.einsum("icp,jcp->cij", J, J)
    assert K.dtype == torch.float64 and K.shape == (C, n, n)
    assert float((K - ref).norm() / ref.norm()) < 1e-5           # float32 gradients, float64 sums
    # and the same as the block-by-input exact path
    assert float((K - empirical_ntk(model, x)).norm() / ref.norm()) < 1e-5


def test_sliced_kernels_one_slice_and_refusals():
    model = small_cnn_bn(C=3).eval()
    x = torch.randn(4, 3, 8, 8)
    K, info = sliced_class_kernels(model, x)
    assert info["groups"] == 1 and info["split_parameters"] == []
    assert torch.allclose(K, empirical_ntk(model, x), rtol=1e-5, atol=1e-8)
    with pytest.raises(DNTKError, match="memory_budget_bytes"):
        sliced_class_kernels(model, x, memory_budget_bytes=8)
    with pytest.raises(DNTKError, match="is empty"):
        sliced_class_kernels(model, x[:0])


class _Experts(nn.Module):
    """Each input is routed to one of two layers: the first input never reaches ``b``."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        route = (x[:, :1] > 0).float()
        return route * self.a(x) + (1 - route) * self.b(x)


def test_sliced_kernels_count_parameters_the_first_input_does_not_reach():
    torch.manual_seed(0)
    model = _Experts()
    x = torch.randn(8, 4)
    x[0, 0], x[1, 0] = 1.0, -1.0
    J = brute_force_jacobian(model, x).double()
    ref = torch.einsum("icp,jcp->cij", J, J)
    for budget in (1 << 20, 4 * 3 * 8 * 6):     # one slice; then slices of 6 elements (both layers cut)
        K, info = sliced_class_kernels(model, x, memory_budget_bytes=budget)
        assert info["parameters"] == 30
        assert float((K - ref).norm() / ref.norm()) < 1e-6, budget
    # a float64 model is contracted in float64
    md = _Experts().double()
    J = brute_force_jacobian(md, x.double())
    K, info = sliced_class_kernels(md, x.double(), memory_budget_bytes=8 * 3 * 8 * 6)
    assert info["groups"] == 5 and float((K - torch.einsum("icp,jcp->cij", J, J)).abs().max()) < 1e-12


def test_plan_parameter_slices_partition_every_element_once():
    widths = {"a": 10, "b": 3, "c": 25, "d": 1}
    for cap in (1, 4, 7, 39, 100):
        groups = plan_parameter_slices(widths, cap)
        assert all(sum(hi - lo for lo, hi in g.values()) <= cap for g in groups)
        for name, w in widths.items():
            covered = sorted((lo, hi) for g in groups for n_, (lo, hi) in g.items() if n_ == name)
            assert covered[0][0] == 0 and covered[-1][1] == w
            assert all(a[1] == b[0] for a, b in zip(covered, covered[1:]))   # contiguous, no overlap
        assert len(groups) == -(-sum(widths.values()) // cap)               # packed full


# --- theory diagnostics ---------------------------------------------------------------------------------
def test_subspace_diagnostics_against_dense_projectors():
    g = torch.Generator().manual_seed(0)
    k = 12
    A = torch.randn(k, k, generator=g, dtype=torch.float64)
    G = torch.randn(200, k, generator=g, dtype=torch.float64) @ A
    H = torch.randn(90, k, generator=g, dtype=torch.float64) @ A
    yH = torch.arange(90) % 3
    V = torch.randn(5, k, generator=g, dtype=torch.float64)
    yV = torch.tensor([0, 1, 2, 0, 1])
    out = subspace_diagnostics(G, H, V, labels_heldout=yH, labels_V=yV)
    Q, _ = torch.linalg.qr(V.T)                            # independent orthonormal basis of span(V)
    Pi = Q @ Q.T
    I = torch.eye(k, dtype=torch.float64)
    S = G.T @ G / len(G)
    lam = torch.linalg.eigvalsh(S).flip(0)
    assert out["dim"] == 5
    assert out["residual"] == pytest.approx(float(torch.trace((I - Pi) @ S) / torch.trace(S)), rel=1e-10)
    assert out["pca_tail"] == pytest.approx(float(lam[5:].sum() / lam.sum()), rel=1e-10)
    assert out["heldout_residual"] == pytest.approx(float(((H @ (I - Pi)) ** 2).sum() / (H ** 2).sum()), rel=1e-10)
    res, mis = [], []
    for y in range(3):
        gt = H[yH == y].mean(0)
        gd = V[yV == y].mean(0)
        res.append(float(((I - Pi) @ gt).norm() ** 2 / gt.norm() ** 2))
        mis.append(float((gd - Pi @ gt).norm() ** 2 / gt.norm() ** 2))
    assert out["task_residual"] == pytest.approx(sum(res) / 3, rel=1e-10)
    assert out["task_misalignment"] == pytest.approx(sum(mis) / 3, rel=1e-10)
    pca = subspace_diagnostics(G, H, None, labels_heldout=yH, pca_dim=5)
    assert abs(pca["gap"]) < 1e-12 and pca["task_misalignment"] is None
    assert pca["residual"] <= out["residual"] + 1e-12                  # PCA is optimal on Σ_g of G
    with pytest.raises(DNTKError, match="labels_V"):
        subspace_diagnostics(G, H, V, labels_heldout=yH)


# --- costs ------------------------------------------------------------------------------------------------
def test_model_flops_closed_form_for_an_mlp():
    d, h, C = 6, 5, 3
    model = nn.Sequential(nn.Linear(d, h), nn.ReLU(), nn.Linear(h, C))
    fl = model_flops(model, torch.randn(2, d))
    assert fl["forward"] == 2 * d * h + 2 * h * C
    # backward of one logit: ∂W2 (2hC), ∂hidden (2hC), ∂W1 (2dh); no gradient to the input
    assert fl["backward_one_logit"] == 2 * d * h + 4 * h * C
    assert fl["per_logit_gradient"] == fl["forward"] + fl["backward_one_logit"]


def test_exact_entk_cost_formula():
    c = exact_entk_cost(4, 2, 3, 100, flops_per_input=10.0, seconds_per_gradient=0.5,
                        contraction_flops_per_second=1000.0)
    J = 6 * 3
    assert c["per_logit_jacobians"] == J and c["jacobian_bytes"] == J * 100 * 4
    assert c["gradient_flops"] == 6 * 10.0                                   # one forward + C backward per input
    assert c["contraction_flops"] == 2 * 100 * 3 * (16 + 8)
    assert c["seconds"] == pytest.approx(J * 0.5 + 2 * 100 * 3 * 24 / 1000)
    assert c["kernel_bytes"] == 8 * 3 * (16 + 8)


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def _touch_256mb():
    """256 MiB of fresh anonymous pages, every one written (an mmap of its own: no allocator can serve it
    from pages the process already holds), then unmapped."""
    import mmap

    m = mmap.mmap(-1, 256 << 20)
    for i in range(0, 256 << 20, 4096):
        m[i] = 1
    m.close()


def test_stage_timer_records_each_stages_own_peak():
    from dntk.resources import reset_peak_rss

    st = StageTimer()
    entry = {}
    with st.time("big"):                       # the big stage first: the small one must not inherit its peak
        entry["big"] = _rss_mb()
        _touch_256mb()
    with st.time("small"):
        entry["small"] = _rss_mb()
    with st.time("reset inside"):              # code inside that starts its own window (WMDD, select_real do)
        entry["reset inside"] = _rss_mb()
        _touch_256mb()
        reset_peak_rss()
    rise = {name: st.peak_rss_mb[name] - entry[name] for name in entry}
    assert rise["big"] >= 200 and rise["reset inside"] >= 200 and rise["small"] < 100, (rise, st.peak_rss_mb)
    assert set(st.timings) == {"small", "big", "reset inside"}


def test_compare_with_exact_reference_rows():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(20, 3, generator=g, dtype=torch.float64)
    logits = pred + 0.1 * torch.randn(20, 3, generator=g, dtype=torch.float64)
    labels = logits.argmax(1)
    K = torch.randn(3, 4, 4, generator=g, dtype=torch.float64)
    rows = compare_with_exact(pred, logits, labels, {"same": {"pred": pred.clone(), "K_train": K.clone()},
                                                     "scaled": {"pred": 2 * pred}}, K_exact=K)
    assert rows[0]["name"] == "exact eNTK"
    assert rows[1]["agreement_with_exact"] == 1.0 and rows[1]["relative_mse_to_exact"] == 0.0
    assert rows[1]["kernel_relative_error"] == pytest.approx(0.0, abs=1e-15)
    assert rows[2]["relative_mse_to_exact"] == pytest.approx(1.0)     # ‖2p − p‖² / ‖p‖²
    assert "kernel_relative_error" not in rows[2]


# --- the command end to end on a tiny ImageFolder tree -------------------------------------------------------------
def _tree(root, n_train=16, n_val=8, size=16):
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("val", n_val)):
        for ci, c in enumerate(("a", "b", "c")):
            d = root / split / c
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                arr = (rng.random((size, size, 3)) * 120).astype(np.uint8)
                arr[..., ci] += 100
                Image.fromarray(arr).save(d / f"{i}.png")


TINY = ["--set", "image_size=16", "--set", "model=small_cnn", "--set", "epochs=2", "--set", "ipc=4",
        "--set", "wmdd_iterations=2", "--set", "student_epochs=2", "--set", "n_test=12", "--set", "k=64",
        "--set", "clusters=3", "--theory-images", "24", "--exact-train", "6", "--exact-test", "6", "--quiet"]


def test_reproduce_end_to_end_report_and_resume(tmp_path):
    from dntk.data import balanced_indices, load_configured
    from dntk.config import RunConfig
    from dntk.models import load_checkpoint
    from dntk.training import build_network

    root, out = tmp_path / "data", tmp_path / "out"
    _tree(root)
    assert main(["reproduce", "--data-root", str(root), "--out", str(out), *TINY]) == 0
    summary = json.loads((out / "reproduce.json").read_text())
    report = (out / "report" / "report.md").read_text()
    for fig in ("figure1.png", "figure2.png", "figure3.png", "figure4.png", "figure5.png"):
        assert (out / "report" / fig).exists() and f"]({fig})" in report
    # the exact subset's kernel is the exact eNTK of those images (recomputed here independently)
    cfg = RunConfig.from_options(dataset="folder", data_root=str(root), image_size=16, model="small_cnn",
                                 n_test=12).resolved()
    train_set, test_set = load_configured(cfg.data)
    teacher = load_checkpoint(build_network(cfg.teacher, "folder", 16, train_set), out / "teacher" / "best.pt").eval()
    from dntk.distill.distilled import load_distilled

    ds = load_distilled(out / "distill-wmdd-ipc4-seed0")
    Xd, yd = ds.tensors(balanced_indices(ds.labels, len(ds), 3))
    X_tr = Xd[balanced_indices(yd, 6, 3)]
    X_te, _ = test_set.tensors(balanced_indices(test_set.labels, 6, 3))
    blob = torch.load(next(out.glob("exact-subset-*.pt")), weights_only=False)
    ref = empirical_ntk(teacher, torch.cat([X_tr, X_te]))
    assert float((blob["K"] - ref).norm() / ref.norm()) < 1e-5
    rows = summary["exact"]["rows"]
    levels = {max(1, round(6 / r)) for r in (20, 50, 100)}                 # Algorithm 1's distinct s at 20/50/100×
    assert rows[0]["name"] == "exact eNTK" and len(rows) == 1 + 3 + len(levels)   # + 3 projection dimensions
    # the theory table: Proposition 3.6's gap is ≥ 0, zero on the PCA subspace, and PCA (fitted on the Σ_g
    # sample) has the smallest residual on it
    th = summary["theory"]["subspaces"]
    assert abs(th["pca"]["gap"]) < 1e-9
    assert all(v["gap"] > -1e-9 and th["pca"]["residual"] <= v["residual"] + 1e-12 for v in th.values())
    assert [c["claim"][:4] for c in summary["claims"]] == ["(i) ", "(ii)", "(iii", "(iv)", "(v) "]
    # Algorithm 1 at 20/50/100× is in Figure 3's rows whatever m is (here m = 12: s = 1)
    assert {(r["target_compression"], r["s"], r["method"]) for r in summary["algorithm1"]} >= \
        {(20, 1, "local-global"), (50, 1, "local-global"), (100, 1, "local-global")}
    # ... beside the spectral optimum: eigen and hybrid-eigen in the same rows, every row with the held-out and
    # kernel-level measures per seed, and the report's comparison is compare_methods of the teacher base's rows
    assert {(20, 1, "eigen"), (20, 1, "hybrid-eigen")} <= {(r["target_compression"], r["s"], r["method"])
                                                          for r in summary["algorithm1"]}
    assert all(len(r["nystrom_fraction_values"]) == r["seeds"] == 3 for r in summary["algorithm1"])
    from dntk.gradient_distillation import compare_methods

    res_t = json.loads((out / "report" / "results_teacher_base.json").read_text())
    so = summary["spectral_optimum"]
    again = compare_methods(res_t["gradient_distillation"]["figure3_rows"], "local-global", "eigen")
    assert json.dumps(so["rows"], sort_keys=True) == json.dumps(again, sort_keys=True)   # NaN t (no spread) == NaN
    assert sum(so["wins"]["1"].values()) == len([w for w in so["rows"] if w["s"] == 1]) > 0
    assert "Beside claim (iii): Algorithm 1 against the spectral optimum" in report and so["verdict"][1:] in report
    stages = {s["stage"].split(" (")[0]: s for s in summary["costs"]["stages"]}
    feats = stages["features"]
    assert feats["jacobians"] == 2 * (12 + 12) * 3                     # 2 models × (m + n_test) × C
    from dntk.store import digest

    X_all_test, _ = test_set.tensors()
    run_inputs = {digest(Xd), digest(X_all_test)}          # the runs' own stores: both models, m points and test split

    def ident(p):
        return json.loads((p / "manifest.json").read_text())["identity"]

    run_stores = [p for p in out.glob("features-*") if ident(p)["inputs"] in run_inputs
                  and ident(p)["projector"]["k"] == 64]
    assert len(run_stores) == 4 and len(list(out.glob("features-*"))) > 4   # theory and exact stores are elsewhere
    assert feats["bytes"] == sum(f.stat().st_size for p in run_stores for f in p.rglob("*") if f.is_file())
    assert summary["costs"]["stages"][0]["seconds"] == pytest.approx(
        sum(h["seconds"] for h in json.loads((out / "teacher" / "history.json").read_text())))
    # a second invocation resumes: no feature shard, kernel, trained network or WMDD set is written again
    # (the random and k-center subsets of the theory step are re-drawn: seeded, cheap, identical)
    watched = [f for f in out.rglob("*") if f.is_file() and (f.suffix in (".npy", ".pt") or f.name in
               ("history.json", "manifest.json")) and not {"report", "distill-random-ipc4-seed0",
                                                         "distill-kcenter-ipc4-seed0"} & set(f.parts)]
    assert any("distill-wmdd" in str(f) for f in watched) and any("student-" in str(f) for f in watched)
    before = {f: f.stat().st_mtime_ns for f in watched}
    assert main(["reproduce", "--data-root", str(root), "--out", str(out), *TINY]) == 0
    assert {f: f.stat().st_mtime_ns for f in watched} == before
    # the resumed invocation found the theory diagnostics cached and still counts their feature folders' bytes
    def theory_bytes(summ):
        return next(s_["bytes"] for s_ in summ["costs"]["stages"] if s_["stage"].startswith("evaluation: theory"))

    again = json.loads((out / "reproduce.json").read_text())
    assert theory_bytes(again) == theory_bytes(summary) > 10_000


def test_reproduce_refuses_bad_options(tmp_path, capsys):
    root = tmp_path / "data"
    _tree(root, 2, 1)
    assert main(["reproduce", "--data-root", str(root), "--set", "nonsense=3"]) == 1
    assert "unknown option 'nonsense'" in capsys.readouterr().err
    assert main(["reproduce", "--data-root", str(root), "--set", "ipc=0"]) == 1
    assert "--ipc 0" in capsys.readouterr().err
    assert main(["reproduce", "--data-root", str(root), "--set", "epochs"]) == 1
    assert "NAME=VALUE" in capsys.readouterr().err
    assert main(["reproduce", "--data-root", str(tmp_path / "missing")]) == 1
    assert "not a folder" in capsys.readouterr().err
    assert main(["reproduce", "--data-root", str(root), "--exact-memory-gb", "0"]) == 1


def test_probe_extrapolates_from_measured_units(tmp_path):
    from dntk.pipeline.reproduce import ReproduceConfig, probe

    root = tmp_path / "data"
    _tree(root, 4, 2)
    rc = ReproduceConfig(data_root=str(root), out=str(tmp_path / "out"), progress=False,
                         overrides={"image_size": 16, "model": "small_cnn", "k": 64})
    p = probe(rc, n_images=4)
    units = p["seconds_per_image"]
    teacher = p["stages"][0]
    assert teacher["seconds"] == pytest.approx(units["train_step"] * 14 * 12)        # cpu64: 14 epochs, 12 images
    assert p["exact_full"]["per_logit_jacobians"] == (12 + 6) * 3
    assert p["exact_full"]["seconds"] > 0 and p["total_seconds"] == pytest.approx(sum(s["seconds"] for s in p["stages"]))


def test_resize_then_crop(tmp_path):
    from dntk.config import RunConfig
    from dntk.data import load_configured

    root = tmp_path / "data"
    _tree(root, 2, 1, size=24)
    plain = load_configured(RunConfig.from_options(dataset="folder", data_root=str(root), image_size=16).data)[0]
    margin = load_configured(RunConfig.from_options(dataset="folder", data_root=str(root), image_size=16,
                                                    resize=20).data)[0]
    import torchvision.transforms.functional as TF

    im = Image.open(root / "train" / "a" / "0.png").convert("RGB")
    want = TF.pil_to_tensor(TF.center_crop(TF.resize(im, 20, antialias=True), 16))
    assert torch.equal(margin.images[0], want)
    assert not torch.equal(plain.images[0], margin.images[0])
