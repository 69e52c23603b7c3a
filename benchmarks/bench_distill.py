"""Stage 1 on full ImageNette at 64 px: WMDD versus random and k-center real subsets.

Usage:  python benchmarks/bench_distill.py [--ipcs 10 50] [--seeds 0 1 2] [--iterations 100]
                                           [--student-epochs 20]

Teacher: the cached ResNet-18 of bench_gradients.py (ImageNet stem, 64 px, all 9,469 training
images). For each IPC, method and seed: the distilled set (cached under runs/imagenette64/), the
per-class KRR on its projected NTK features (tensorsketch, k = 4096, trace-normalised, ridge 1e-4,
teacher logits as targets) evaluated on all 3,925 val images (fidelity, accuracy), the test
accuracy of a student of the teacher's architecture trained on it with the teacher's soft labels,
and the distillation time and peak memory. The reference row uses all 9,469 real training images.
Everything is cached, so an interrupted run resumes. Writes benchmarks/results/distill.json.

WMDD runs ``--iterations`` optimisation steps per class (WMDD's own scripts use 2,000 on a GPU);
the figure is stated in the output.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gradients import ROOT, feature_arrays, teacher_and_data  # noqa: E402
from common import machine, table, write_json  # noqa: E402

import dntk  # noqa: E402
from dntk import metrics  # noqa: E402
from dntk.distill import distill  # noqa: E402
from dntk.distill.store import DistilledSet  # noqa: E402
from dntk.kernels import PerClassKRR  # noqa: E402
from dntk.models import build_model  # noqa: E402
from dntk.pipeline.run import _cached, _digest, model_checksum  # noqa: E402
from dntk.training import TrainConfig, evaluate, train  # noqa: E402


def krr(model, X, fte, te, key, ridge=1e-4):
    proj = dntk.projection.make("tensorsketch", k=4096, seed=0)
    f = _cached(ROOT / f"bench-distill-feat-{key}.pt", lambda: feature_arrays(model, X, proj, progress=False))
    pred = PerClassKRR(ridge=ridge).fit(f["features"], f["logits"]).predict(fte["features"])
    return metrics.summarize(pred, fte["logits"], te.labels)


def student_accuracy(ds: DistilledSet, teacher, te, epochs, seed, key):
    def run():
        with torch.no_grad():
            soft = teacher(ds.images)
        student = build_model("resnet18", 10, 3, 64, stem="imagenet")
        torch.manual_seed(seed)
        cfg = TrainConfig(epochs=epochs, optimizer="adamw", batch_size=min(64, len(ds)), weight_decay=0.01, seed=seed,
                          eval_every=epochs)
        train(student, ds, te, cfg, ROOT / f"bench-student-{key}", soft_labels=soft, progress=False)
        return {"accuracy": evaluate(student, te)[0]}
    return _cached(ROOT / f"bench-student-{key}.result.pt", run)["accuracy"]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ipcs", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["random", "kcenter", "wmdd"])
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--student-epochs", type=int, default=20)
    ap.add_argument("--skip-real", action="store_true", help="skip the all-real-images reference row")
    args = ap.parse_args()
    torch.set_num_threads(2)
    teacher, tr, te = teacher_and_data()
    ck = model_checksum(teacher)
    teacher_acc = evaluate(teacher, te)[0]
    proj = dntk.projection.make("tensorsketch", k=4096, seed=0)
    fte = _cached(ROOT / f"bench-val-{_digest(ck, 4096)}.pt", lambda: feature_arrays(teacher, te.tensors()[0], proj))
    results = []
    for ipc in args.ipcs:
        for method in args.methods:
            for seed in args.seeds:
                out = ROOT / f"distill-{method}-ipc{ipc}-seed{seed}"
                t = time.perf_counter()
                opts = {"iterations": args.iterations} if method == "wmdd" else {}
                ds = (dntk.distill.load_distilled(out) if (out / "distilled.pt").exists() and
                      json.loads((out / "manifest.json").read_text()).get("settings", {}).get("iterations",
                                                                                             args.iterations)
                      == args.iterations else
                      distill(method, teacher, tr, ipc, out, seed=seed, teacher_checksum=ck, **opts))
                manifest = json.loads((out / "manifest.json").read_text())
                key = f"{method}-ipc{ipc}-seed{seed}-{_digest(ds.images)}"
                k = krr(teacher, ds.images, fte, te, key)
                acc = student_accuracy(ds, teacher, te, args.student_epochs, seed, key + f"-e{args.student_epochs}")
                row = {"ipc": ipc, "m": len(ds), "method": method, "seed": seed, **k, "student_accuracy": acc,
                       "distill_seconds": manifest.get("seconds"), "distill_peak_mb": manifest.get("peak_memory_mb"),
                       "wall_seconds": time.perf_counter() - t}
                results.append(row)
                print(json.dumps(row))
                write_json("distill.json", {"machine": machine(), "rows": results, "partial": True})
    real = None
    if not args.skip_real:
        X, _ = tr.tensors()
        real = krr(teacher, X, fte, te, f"real-all-{_digest(ck)}")
        real.update({"ipc": None, "m": len(tr), "method": "all real images", "student_accuracy": teacher_acc})
    summary = []
    for ipc in args.ipcs:
        for method in args.methods:
            sel = [r for r in results if r["ipc"] == ipc and r["method"] == method]
            row = {"ipc": ipc, "m": sel[0]["m"], "method": method, "seeds": len(sel)}
            for key in ("fidelity", "accuracy", "mse", "student_accuracy", "distill_seconds", "distill_peak_mb"):
                vals = [r[key] for r in sel if r.get(key) is not None]
                row[key] = statistics.mean(vals) if vals else None
                row[f"{key}_std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
            summary.append(row)
    if real:
        summary.append({**real, "seeds": 1})
    cols = [("ipc", "IPC", "{}"), ("m", "m", "{}"), ("method", "method", ""), ("fidelity", "KRR fidelity", "{:.4f}"),
            ("fidelity_std", "±", "{:.4f}"), ("accuracy", "KRR accuracy", "{:.4f}"), ("accuracy_std", "±", "{:.4f}"),
            ("student_accuracy", "student acc.", "{:.4f}"), ("student_accuracy_std", "±", "{:.4f}"),
            ("distill_seconds", "distill s", "{:.0f}"), ("distill_peak_mb", "peak MB", "{:.0f}")]
    print(f"\nteacher val accuracy {teacher_acc:.4f}; WMDD iterations per class: {args.iterations}; "
          f"student epochs: {args.student_epochs}; seeds {args.seeds}")
    print(table(summary, cols))
    verdict = {}
    for ipc in args.ipcs:
        w = next((r for r in summary if r["ipc"] == ipc and r["method"] == "wmdd"), None)
        rnd = next((r for r in summary if r["ipc"] == ipc and r["method"] == "random"), None)
        if w and rnd:
            verdict[f"ipc{ipc}"] = {"wmdd_beats_random_fidelity": w["fidelity"] > rnd["fidelity"],
                                    "wmdd_beats_random_accuracy": w["accuracy"] > rnd["accuracy"]}
    print("WMDD vs random:", verdict)
    write_json("distill.json", {"machine": machine(), "teacher_val_accuracy": teacher_acc, "wmdd_iterations": args.iterations,
                                "student_epochs": args.student_epochs, "rows": results, "summary": summary,
                                "verdict": verdict, "partial": False})


if __name__ == "__main__":
    main()
