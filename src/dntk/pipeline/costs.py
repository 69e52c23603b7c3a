"""The cost side of ``dntk reproduce``: the ledger of every stage's wall time and peak memory, the
per-stage Jacobians / FLOPs / bytes, the uncompressed exact eNTK extrapolated from measured unit costs,
and :func:`probe`, which measures a setting's unit costs on a few images and extrapolates every stage.

The stage FLOP formulas live once, in :func:`stage_flops`, and both the run's accounting and the probe
use them (``model_flops``' forward F and one-logit backward B of one image)."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import DNTKError
from ..features import sliced_class_kernels
from ..projection import make as make_projector
from ..resources import StageTimer, contraction_rate, exact_entk_cost, folder_bytes, model_flops, process_peak_rss_mb
from ..store import FeatureStore, atomic_json
from .stage1 import distilled_folder


def stage_flops(fl: dict, cfg, *, C: int, n_real: int, m: int, n_test: int) -> dict:
    """FLOPs of the stages that have a formula, from ``model_flops``' {forward F, backward_one_logit B}
    of one image and a RunConfig: teacher = epochs × n_real × (F + B); distillation (WMDD) = iterations ×
    m × (F + B) (the parameter backward stands in for the one to the pixels); student = epochs × m ×
    (2F + B) (its forward and backward and the teacher's relabelling forward); features = 2 models ×
    (m + n_test) × (F + C·B)."""
    F, B = fl["forward"], fl["backward_one_logit"]
    return {"teacher": cfg.teacher.epochs * n_real * (F + B),
            "distillation": cfg.distill.wmdd_iterations * m * (F + B),
            "student": cfg.teacher.student_epochs * m * (2 * F + B),
            "features": 2 * (m + n_test) * (F + C * B)}


def test_split_size(cfg, test_set) -> int:
    """The whole test split's size (the run may use --n-test of it)."""
    if cfg.data.n_test is None:
        return len(test_set)
    from ..data import scan_folder

    try:
        return len(scan_folder(cfg.data.data_root, "val")[1])
    except DNTKError:
        return len(test_set)


def ledger(out: Path, res_t: dict, res_s: dict, st: StageTimer) -> dict:
    """OUT/cost-ledger.json: per stage ("teacher_base:features_train", "reproduce:theory", ...) the
    {seconds, peak_rss_mb, peak_gpu_mb} of its longest recorded invocation — the one that computed it
    (a stage resumed half-way keeps only its longer part; said in the report)."""
    path = out / "cost-ledger.json"
    book = json.loads(path.read_text()) if path.exists() else {}
    entries = {}
    for prefix, res in (("teacher_base", res_t), ("student_base", res_s)):
        mem = res.get("stage_memory_mb") or {}
        for name, sec in (res.get("timings_s") or {}).items():
            entries[f"{prefix}:{name}"] = {"seconds": sec, "peak_rss_mb": mem.get("rss", {}).get(name),
                                           "peak_gpu_mb": mem.get("gpu", {}).get(name)}
    for name, sec in st.timings.items():
        entries[f"reproduce:{name}"] = {"seconds": sec, "peak_rss_mb": st.peak_rss_mb.get(name),
                                        "peak_gpu_mb": st.peak_gpu_mb.get(name)}
    for name, e in entries.items():
        if name not in book or (e["seconds"] or 0) > (book[name]["seconds"] or 0):
            book[name] = e
    atomic_json(book, path)
    return book


def stage_costs(cfg, res_t, res_s, book: dict, model, train_set, test_set, exact, out: Path, k: int,
           stores: dict) -> dict:
    """Per-stage Jacobians, FLOPs (model profile), bytes, wall time, peak memory; the exact eNTK of all
    training × all test images extrapolated, and the reduction factors against DNTK on the same test images."""
    N_te = test_split_size(cfg, test_set)
    x1 = train_set.tensors(torch.arange(1))[0].to(cfg.device)
    fl = model_flops(model, x1)
    F, B = fl["forward"], fl["backward_one_logit"]
    C = train_set.num_classes
    n_real, m, n_test = len(train_set), res_t["counts"]["m"], res_t["counts"]["n_test"]
    P = res_t["counts"]["parameters"]
    def cost(*names) -> dict:
        """Summed seconds and the largest peaks of ledger stages (names with their prefix)."""
        es = [book[n] for n in names if n in book]
        sec = sum(e["seconds"] or 0 for e in es) if es else None
        rss = [e["peak_rss_mb"] for e in es if e.get("peak_rss_mb") is not None]
        gpu = [e["peak_gpu_mb"] for e in es if e.get("peak_gpu_mb") is not None]
        return {"seconds": sec, "peak_rss_mb": max(rss) if rss else None, "peak_gpu_mb": max(gpu) if gpu else None}

    def with_prefix(prefix, start):
        return [n for n in book if n.startswith(f"{prefix}:{start}")]

    wm = cfg.distill
    flops = stage_flops(fl, cfg, C=C, n_real=n_real, m=m, n_test=n_test)
    manifest = distilled_folder(out, wm.method, wm.ipc, cfg.seed) / "manifest.json"
    recorded = json.loads(manifest.read_text()) if manifest.exists() else {}
    distill_cost = cost("teacher_base:distillation")
    if recorded.get("seconds") and (distill_cost["seconds"] or 0) < recorded["seconds"]:   # computed before
        distill_cost = {"seconds": recorded["seconds"], "peak_rss_mb": recorded.get("peak_memory_mb"),
                        "peak_gpu_mb": None}
    # training time from the checkpoints' own history (whichever invocation trained them); peaks from the ledger
    teacher_seconds = res_t["teacher"].get("train_seconds")
    teacher_cost = {**cost("teacher_base:teacher"), "seconds": teacher_seconds}
    if teacher_seconds is None:
        teacher_cost["peak_rss_mb"] = None
    student_cost = {**cost("student_base:student"), "seconds": res_s["base_model"].get("train_seconds")}
    # the features' time from the stores' own shard records (whichever invocation computed them)
    shard_seconds = [FeatureStore(p).extraction_seconds() for p in stores.get("run", [])]
    feature_seconds = sum(shard_seconds) if shard_seconds and None not in shard_seconds else None
    stages = [
        {"stage": "teacher", "jacobians": 0, "flops": flops["teacher"],
         "flops_how": "epochs × n_train × (forward + backward)", "bytes": folder_bytes(out / "teacher"),
         **teacher_cost, "note": "" if teacher_seconds is not None else "trained before per-epoch times were recorded"},
        {"stage": "distillation (WMDD)", "jacobians": 0, "flops": flops["distillation"],
         "flops_how": "iterations × m × (forward + backward); the parameter backward's FLOPs stand in for the "
                      "backward to the pixels WMDD takes",
         "bytes": folder_bytes(distilled_folder(out, wm.method, wm.ipc, cfg.seed)), **distill_cost},
        {"stage": "student (distilled-data base model)", "jacobians": 0,
         "flops": flops["student"],
         "flops_how": "epochs × m × (student forward + backward + teacher relabel forward)",
         "bytes": folder_bytes(*out.glob("student-*")), **student_cost,
         "note": "" if student_cost["seconds"] is not None else "trained before per-epoch times were recorded"},
        {"stage": "features (teacher + student, projected)", "jacobians": 2 * (m + n_test) * C,
         "flops": flops["features"], "flops_how": "images × (forward + C backward), two models",
         "bytes": folder_bytes(*stores.get("run", [])),
         **cost(*with_prefix("teacher_base", "features"), *with_prefix("student_base", "features")),
         "seconds": feature_seconds,
         "note": "the student run reads the teacher's stored features" + (
             "" if feature_seconds is not None else "; extracted before shard times were recorded")},
        {"stage": "kernels (per-class KRR, Figure 1)", "jacobians": 0,
         "flops": 2 * C * (2 * m * m * k + m ** 3 / 3 + 2 * n_test * m * k),
         "flops_how": "C × (Gram 2m²k + Cholesky m³/3 + test kernel 2·n_test·m·k), both models",
         "bytes": folder_bytes(*out.glob("weights-*")),
         **cost(*with_prefix("teacher_base", "kernel_model"), *with_prefix("student_base", "kernel_model"))},
        {"stage": "gradient distillation (Algorithm 1 + baselines, Figures 2–5)", "jacobians": 0, "flops": None,
         "flops_how": "not profiled (eigendecompositions of [m, m] kernels, clustering): wall time only",
         "bytes": folder_bytes(*out.glob("figure*.png")),
         **cost("teacher_base:gradient_distillation", "teacher_base:figures_stage3")},
        {"stage": "evaluation: theory diagnostics", "jacobians": None, "flops": None,
         "flops_how": "projected features of the random and k-center subsets and the Σ_g sample, then float64 "
                      "eigendecompositions",
         # None: the diagnostics were found cached by a dntk that did not record their feature folders
         "bytes": folder_bytes(*stores["theory"], *out.glob("theory-*.pt")) if stores.get("theory") else None,
         **cost("reproduce:theory")},
    ]
    if exact is not None:
        info = exact["exact"]
        n_sub = exact["n_train"] + exact["n_test"]
        stages.append({"stage": f"evaluation: exact eNTK of the subset ({exact['n_train']} + {exact['n_test']} images)",
                       "jacobians": n_sub * C * info["groups"], "flops": info["groups"] * n_sub * (F + C * B)
                       + info["contraction_flops"], "flops_how": "slices × images × (forward + C backward) + 2·C·n²·P",
                       "bytes": folder_bytes(*stores.get("exact", []), *out.glob("exact-subset-*.pt")),
                       **cost("reproduce:exact_subset")})
    # the uncompressed exact eNTK of every training × test image, from measured unit costs
    full = None
    if exact is not None:
        info = exact["exact"]
        n_sub = exact["n_train"] + exact["n_test"]
        sec_per_grad = info["gradient_seconds"] / (info["groups"] * n_sub * C)   # one materialised per-logit gradient
        rate = info["contraction_flops"] / max(info["contraction_seconds"], 1e-9)
        full = exact_entk_cost(n_real, N_te, C, P, flops_per_input=F + C * B,
                               seconds_per_gradient=sec_per_grad, contraction_flops_per_second=rate)
        full["measured_on"] = {"images": n_sub, "seconds_per_gradient": sec_per_grad, "contraction_flops_per_second": rate}
    # DNTK on the same N_te test images as the exact side (by the same formulas as the stages above)
    dntk_jacobians = (m + N_te) * C
    dntk_flops = (stages[1]["flops"] or 0) + (m + N_te) * (F + C * B) + C * (2 * m * m * k + m ** 3 / 3 + 2 * N_te * m * k)
    s100 = max(1, round(m / 100))            # the paper's 100× point (Algorithm 1's thresholds pick their own s)
    reductions = {"data": n_real / m, "parameters": P / k, "gradients": m / s100,
                  "train_representation": (n_real * P) / (s100 * k)}
    if full is not None:
        dntk_bytes = 4 * (m + N_te) * C * k
        reductions["jacobian_storage"] = full["jacobian_bytes"] / dntk_bytes
        reductions["kernel_storage"] = (n_real ** 2 + n_real * N_te) / (m ** 2 + m * N_te)
        reductions["flops"] = full["flops"] / dntk_flops
        reductions["jacobians"] = full["per_logit_jacobians"] / dntk_jacobians
    return {"model_flops": fl, "flops_counter": "torch.utils.flop_counter.FlopCounterMode: matmuls and convolutions "
            "only", "parameters": P, "k": k, "stages": stages, "exact_full": full, "dntk_flops": dntk_flops,
            "n_test_all": N_te, "n_test_run": n_test,
            "reductions": reductions, "reduction_labels": reduction_labels(s100),
            "process_peak_rss_mb": process_peak_rss_mb()}


def reduction_labels(s100: int) -> dict[str, str]:
    """What each key of ``costs["reductions"]`` divides by what (for the report's table)."""
    return {"data": "data (n_real / m)", "parameters": "parameters (P / k)",
            "gradients": f"gradients (m / s at the paper's 100× point, s = {s100})",
            "train_representation": f"train-side representation: exact n_real·C·P numbers / DNTK s·C·k (s = {s100})",
            "jacobian_storage": "Jacobian storage: exact (n_real + n_test)·C·P / DNTK (m + n_test)·C·k",
            "kernel_storage": "kernel storage (float64): exact C·(n_real² + n_real·n_test) / DNTK C·(m² + m·n_test)",
            "flops": "FLOPs: exact eNTK / DNTK (WMDD + features + kernels)",
            "jacobians": "per-logit Jacobians: exact / DNTK"}


def probe(rc, n_images: int = 8) -> dict:
    """Measure a setting's unit costs on ``n_images`` images on this device and extrapolate every stage
    of :func:`reproduce` (no stage is run in full). Returns {unit costs, stages: [{stage, units, seconds}]}."""
    rc.check()
    cfg = rc.run_config(base_model="teacher")
    from ..data import folder_sample
    from ..features import gradient_features
    from ..training import build_network

    root = Path(rc.data_root)
    if not (root / "train").is_dir():
        raise DNTKError(f"--probe reads {root}/train and {root}/val directly; point --data-root at the ImageFolder "
                        "root that holds them")
    size = cfg.data.image_size
    sample, n_real = folder_sample(root, "train", size, n_images, resize=cfg.data.resize)
    _, n_val = folder_sample(root, "val", size, 1, resize=cfg.data.resize)
    n_test = min(cfg.data.n_test, n_val) if cfg.data.n_test else n_val
    C = sample.num_classes
    model = build_network(cfg.teacher, cfg.data.dataset, size, sample).to(cfg.device)
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    k = cfg.features.resolved_k(model)
    x, y = sample.tensors()
    n_images = len(x)
    x, y = x.to(cfg.device), y.to(cfg.device)
    fl = model_flops(model, x[:1])

    def timed(fn, reps=2):
        fn()   # warm-up
        if "cuda" in str(cfg.device):
            torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        if "cuda" in str(cfg.device):
            torch.cuda.synchronize()
        return (time.perf_counter() - t) / reps

    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def train_step():
        model.train()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    def pixel_step():   # WMDD's step: forward + backward to the pixels
        model.eval()
        xi = x.clone().requires_grad_(True)
        torch.autograd.grad(model(xi).logsumexp(1).sum(), xi)

    def relabel():
        with torch.no_grad():
            model.eval()
            model(x)

    projector = make_projector(cfg.features.projector, k=k, seed=cfg.seed)
    s_train = timed(train_step) / n_images
    s_pixel = timed(pixel_step) / n_images
    s_fwd = timed(relabel) / n_images
    s_feat = timed(lambda: gradient_features(model.eval(), x, projector, progress=False), reps=1) / n_images
    n_ex = min(2, n_images)
    _, info = sliced_class_kernels(model.eval(), x[:n_ex], memory_budget_bytes=1 << 30)
    s_grad = info["gradient_seconds"] / (info["groups"] * n_ex * C)
    # the contraction rate at the exact subset's size (a 2-image product runs at matrix-vector speed)
    n_rate = rc.extra("exact_train") + rc.extra("exact_test")
    rate = contraction_rate(C, n_rate, device=cfg.device)
    m = cfg.distill.ipc * C
    flops = stage_flops(fl, cfg, C=C, n_real=n_real, m=m, n_test=n_test)
    cfg_e = {n: rc.extra(n) for n in ("theory_images", "exact_train", "exact_test")}
    n_sub = cfg_e["exact_train"] + cfg_e["exact_test"]
    groups_sub = -(-4 * C * n_sub * P // rc.exact_memory_bytes)
    stages = [
        {"stage": "teacher", "units": f"{cfg.teacher.epochs} epochs × {n_real} images", "seconds": s_train * cfg.teacher.epochs * n_real,
         "flops": flops["teacher"]},
        {"stage": "distillation (WMDD)", "units": f"{cfg.distill.wmdd_iterations} iterations × {m} images",
         "seconds": s_pixel * cfg.distill.wmdd_iterations * m, "flops": flops["distillation"]},
        {"stage": "student", "units": f"{cfg.teacher.student_epochs} epochs × {m} images",
         "seconds": (s_train + s_fwd) * cfg.teacher.student_epochs * m,
         "flops": flops["student"]},
        {"stage": "features (teacher + student)", "units": f"2 × ({m} + {n_test}) images × {C} logits",
         "seconds": s_feat * 2 * (m + n_test), "flops": flops["features"]},
        {"stage": "theory features (random, k-center, Σ_g sample)", "units": f"{2 * m + cfg_e['theory_images']} images",
         "seconds": s_feat * (2 * m + cfg_e["theory_images"]), "flops": None},
        {"stage": "exact eNTK of the subset", "units": f"{groups_sub} passes × {n_sub} images + contraction",
         "seconds": groups_sub * n_sub * C * s_grad + 2 * C * n_sub ** 2 * P / rate, "flops": None},
    ]
    full = exact_entk_cost(n_real, n_test, C, P, flops_per_input=fl["forward"] + C * fl["backward_one_logit"],
                           seconds_per_gradient=s_grad, contraction_flops_per_second=rate)
    return {"setting": rc.setting, "device": cfg.device, "images_measured": n_images, "parameters": P, "k": k,
            "model_flops": fl, "seconds_per_image": {"train_step": s_train, "pixel_step": s_pixel, "forward": s_fwd,
                                                     "projected_features": s_feat},
            "seconds_per_exact_gradient": s_grad, "contraction_flops_per_second": rate, "stages": stages,
            "total_seconds": sum(s["seconds"] for s in stages), "exact_full": full,
            "config": asdict(rc)}
