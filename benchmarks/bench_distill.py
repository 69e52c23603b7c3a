"""Stage 1 on full ImageNette at 64 px: WMDD versus random and k-center real subsets.

Usage:  python benchmarks/bench_distill.py [--ipcs 10 50] [--seeds 0 1 2] [--iterations 100]
                                           [--student-epochs 15] [--methods random kcenter wmdd ...]

Teacher: the cached ResNet-18 of bench_gradients.py (ImageNet stem, 64 px, all 9,469 training
images). For each IPC, method and seed: the distilled set (cached under runs/imagenette64/), the
per-class KRR on its projected NTK features (tensorsketch, k = 4096, trace-normalised, ridge 1e-4,
teacher logits as targets) evaluated on all 3,925 val images (fidelity, accuracy), the test
accuracy of a student of the teacher's architecture trained on it with the teacher's soft labels,
and the distillation time and peak memory. The reference row uses all 9,469 real training images.
Everything is cached, so an interrupted run resumes. Writes benchmarks/results/distill.json.

Methods: ``random``, ``kcenter``, ``wmdd`` (run here on the CPU for ``--iterations`` steps per class, our
defaults lr 0.05 / bn_weight 1.0) and ``wmdd:<tag>`` — a WMDD variant made on a GPU machine by
benchmarks/wmdd_device.py and loaded from runs/imagenette64/distill-wmdd-<tag>-ipc<ipc>-seed<seed>/:
``wmdd:official`` is WMDD's own recipe (2,000 iterations, lr 0.25, r_bn 3.0), ``wmdd:lr05`` our
defaults at 2,000 iterations (IPC 10 only). A missing variant is skipped with a message.
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
from bench_gradients import DATA, ROOT, TEACHER, features, teacher_and_data  # noqa: E402
from common import RESULTS, machine, table, write_json  # noqa: E402

import dntk  # noqa: E402
from dntk.distill import DistilledSet, distill_dataset  # noqa: E402
from dntk.kernels import fit_evaluate  # noqa: E402
from dntk.store import cached, digest, model_checksum  # noqa: E402
from dntk.training import build_network, evaluate, train_student  # noqa: E402


def krr(model, X, fte, te, tag, ridge=1e-4):
    """The library's kernel model (trace-normalised per-class KRR on teacher logits) on the points X."""
    f = features(model, X, f"distill-{tag}", progress=False)
    return fit_evaluate(f, f.logits, fte, fte.logits, te.labels, ridge=ridge)


def student_accuracy(ds: DistilledSet, teacher, te, epochs, seed, key, relabel=False):
    """Test accuracy of the library's student (dntk.training.train_student) trained on ds with the
    teacher's soft labels: fixed per image, or (relabel) the teacher's logits on every augmented batch,
    as WMDD's FKD relabelling does; evaluated once, after the last epoch."""
    def run():
        student = build_network(TEACHER, DATA.dataset, DATA.image_size, te)
        _, acc = train_student(student, teacher, ds, te, ROOT / f"bench-student-{key}", dataset=DATA.dataset,
                               epochs=epochs, seed=seed, relabel=relabel, eval_every=epochs, progress=False)
        return {"accuracy": acc}
    return cached(ROOT / f"bench-student-{key}.result.pt", run)["accuracy"]


def wmdd_image_figure(tr, path, seed=0, ipc=10):
    """Per class: the first WMDD image's initial real photo, then the same image after each WMDD variant
    found under runs/ (seed 0, IPC 10) — what the kernel model and the students are given."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = [(t, lab) for t, lab in (("", "WMDD 100 it. (CPU)"), ("lr05-", "lr 0.05, r_bn 1, 2,000 it."),
                                        ("official-", "WMDD's own: lr 0.25, r_bn 3, 2,000 it."))
                if (ROOT / f"distill-wmdd-{t}ipc{ipc}-seed{seed}" / "distilled.pt").exists()]
    if not variants:
        return
    mean, std = torch.tensor(tr.mean).view(3, 1, 1), torch.tensor(tr.std).view(3, 1, 1)
    first = ROOT / f"distill-wmdd-{variants[0][0]}ipc{ipc}-seed{seed}"
    records = json.loads((first / "manifest.json").read_text())["per_class"]
    C = tr.num_classes
    fig, ax = plt.subplots(len(variants) + 1, C, figsize=(1.5 * C, 1.6 * (len(variants) + 1)), squeeze=False)
    for c in range(C):
        members = torch.nonzero(tr.labels == c).flatten()
        ims = [tr.images[members[records[tr.classes[c]]["init_indices"][0]]].float() / 255]
        ims += [(dntk.distill.load_distilled(ROOT / f"distill-wmdd-{t}ipc{ipc}-seed{seed}").images[c * ipc] * std
                 + mean).clamp(0, 1) for t, _ in variants]
        for i, im in enumerate(ims):
            ax[i, c].imshow(im.permute(1, 2, 0).numpy())
            ax[i, c].axis("off")
    for i, lab in enumerate(["initial real image"] + [lab for _, lab in variants]):
        ax[i, 0].set_title(lab, loc="left", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=60)
    plt.close(fig)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ipcs", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["random", "kcenter", "wmdd", "wmdd:official", "wmdd:lr05"])
    ap.add_argument("--extra-seeds", type=int, nargs="*", default=[3, 4, 5],
                    help="more seeds for --extra-methods only (the random baseline and the candidate)")
    ap.add_argument("--extra-methods", nargs="*", default=["random", "wmdd:lr05"])
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--student-epochs", type=int, default=15)
    ap.add_argument("--skip-real", action="store_true", help="skip the all-real-images reference row")
    args = ap.parse_args()
    torch.set_num_threads(2)
    teacher, tr, te = teacher_and_data()
    ck = model_checksum(teacher)
    teacher_acc = evaluate(teacher, te)[0]
    fte = features(teacher, te.tensors()[0], "val")
    results = []
    jobs = [(m, s) for m in args.methods for s in args.seeds]
    jobs += [(m, s) for m in args.extra_methods for s in args.extra_seeds if (m, s) not in jobs]
    order = list(dict.fromkeys(args.methods + args.extra_methods))
    members = [torch.nonzero(tr.labels == c).flatten() for c in range(tr.num_classes)]
    for ipc in args.ipcs:
        for method, seed in sorted(jobs, key=lambda j: (order.index(j[0]), j[1])):
            t = time.perf_counter()
            if ":" in method:     # a WMDD variant made elsewhere (benchmarks/wmdd_device.py), loaded as is
                out = ROOT / f"distill-wmdd-{method.split(':')[1]}-ipc{ipc}-seed{seed}"
                if not (out / "distilled.pt").exists():
                    print(f"{method} ipc {ipc} seed {seed}: {out} missing (make it with wmdd_device.py); skipped")
                    continue
                ds = dntk.distill.load_distilled(out)
            else:
                out = ROOT / f"distill-{method}-ipc{ipc}-seed{seed}"
                opts = {"iterations": args.iterations} if method == "wmdd" else {}
                man = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").exists() else {}
                # reused only when made from this teacher with these iterations (else distilled again)
                done = ((out / "distilled.pt").exists() and man.get("teacher_checksum") == ck
                        and man.get("settings", {}).get("iterations", args.iterations) == args.iterations)
                ds = (dntk.distill.load_distilled(out) if done else
                      distill_dataset(method, teacher, tr, ipc, out, seed=seed, teacher_checksum=ck, **opts))
            manifest = json.loads((out / "manifest.json").read_text())
            name = method.replace(":", "-")
            key = f"{name}-ipc{ipc}-seed{seed}-{digest(ds.images)}-{ck[:12]}"   # the student depends on the teacher too
            k = krr(teacher, ds.images, fte, te, key)
            acc = student_accuracy(ds, teacher, te, args.student_epochs, seed, key + f"-e{args.student_epochs}")
            acc_relabel = student_accuracy(ds, teacher, te, args.student_epochs, seed,
                                           key + f"-e{args.student_epochs}-relabel", relabel=True)
            st = manifest.get("settings", {})
            gpu_peaks = [r.get("peak_gpu_mb") for r in manifest.get("per_class", {}).values()
                         if r.get("peak_gpu_mb") is not None]
            row = {"ipc": ipc, "m": len(ds), "method": name, "seed": seed, **k, "student_accuracy": acc,
                   "student_accuracy_relabel": acc_relabel,
                   "distill_seconds": manifest.get("seconds"),
                   "distill_peak_mb": max(gpu_peaks) if gpu_peaks else manifest.get("peak_memory_mb"),
                   "distill_peak_kind": "GPU allocated" if gpu_peaks else "process RSS",
                   "distill_device": ",".join(manifest.get("devices", ["cpu"])),
                   "wmdd_iterations": st.get("iterations"), "wmdd_lr": st.get("lr"),
                   "wmdd_bn_weight": st.get("bn_weight"), "wall_seconds": time.perf_counter() - t}
            if name.startswith("wmdd"):
                row["init_index"] = torch.cat([members[c][torch.tensor(r["init_indices"])]
                                               for c, r in enumerate(manifest["per_class"].values())]).tolist()
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "init_index"}))
            write_json("distill.json", {"machine": machine(), "rows": results, "partial": True})
    real = paired = None
    if not args.skip_real:
        X, _ = tr.tensors()
        fa = features(teacher, X, "train-all", progress=False)   # every training image: bench_select shares the store
        real = fit_evaluate(fa, fa.logits, fte, fte.logits, te.labels, ridge=1e-4)
        del fa
        real.update({"ipc": None, "m": len(tr), "method": "all real images", "student_accuracy": teacher_acc})
        # paired comparison: each WMDD set against the random real subset it was initialised from
        # (rows of the all-real features: no new Jacobians), which cancels the luck of the draw
        fr = features(teacher, X, "train-all", progress=False)   # stored by krr() above (bench_select fills it too)
        paired = []
        for r in results:
            if "init_index" in r:
                idx = torch.tensor(r.pop("init_index"))
                init = fit_evaluate(fr.subset(idx), fr.logits[idx], fte, fte.logits, te.labels, ridge=1e-4)
                paired.append({"ipc": r["ipc"], "method": r["method"], "seed": r["seed"],
                               "init_fidelity": init["fidelity"], "fidelity": r["fidelity"],
                               "fidelity_gain": r["fidelity"] - init["fidelity"], "init_accuracy": init["accuracy"],
                               "accuracy": r["accuracy"], "accuracy_gain": r["accuracy"] - init["accuracy"]})
        del fr
    summary = []
    for ipc in args.ipcs:
        for method in dict.fromkeys(r["method"] for r in results):
            sel = [r for r in results if r["ipc"] == ipc and r["method"] == method]
            if not sel:
                continue
            row = {"ipc": ipc, "m": sel[0]["m"], "method": method, "seeds": len(sel)}
            row.update({k: sel[0][k] for k in ("distill_device", "distill_peak_kind", "wmdd_iterations", "wmdd_lr",
                                                "wmdd_bn_weight")})
            for key in ("fidelity", "accuracy", "mse", "student_accuracy", "student_accuracy_relabel", "distill_seconds",
                        "distill_peak_mb"):
                vals = [r[key] for r in sel if r.get(key) is not None]
                row[key] = statistics.mean(vals) if vals else None
                row[f"{key}_std"] = statistics.pstdev(vals) if len(vals) > 1 else 0.0
            summary.append(row)
    if real:
        summary.append({**real, "seeds": 1})
    cols = [("ipc", "IPC", "{}"), ("m", "m", "{}"), ("method", "method", ""), ("seeds", "seeds", "{}"), ("wmdd_iterations", "iters", "{}"),
            ("distill_device", "device", ""), ("fidelity", "KRR fidelity", "{:.4f}"),
            ("fidelity_std", "±", "{:.4f}"), ("accuracy", "KRR accuracy", "{:.4f}"), ("accuracy_std", "±", "{:.4f}"),
            ("student_accuracy", "student acc.", "{:.4f}"), ("student_accuracy_std", "±", "{:.4f}"),
            ("student_accuracy_relabel", "relabelled", "{:.4f}"), ("student_accuracy_relabel_std", "±", "{:.4f}"),
            ("distill_seconds", "distill s", "{:.0f}"), ("distill_peak_mb", "peak MB", "{:.0f}"), ("distill_peak_kind", "peak of", "")]
    print(f"\nteacher val accuracy {teacher_acc:.4f}; WMDD iterations per class: {args.iterations}; "
          f"student epochs: {args.student_epochs}; seeds {args.seeds}")
    print(table(summary, cols))
    verdict = {}
    for ipc in args.ipcs:
        rnd = next((r for r in summary if r["ipc"] == ipc and r["method"] == "random"), None)
        for w in (r for r in summary if r["ipc"] == ipc and r["method"].startswith("wmdd") and rnd):
            verdict.setdefault(w["method"], {})[f"ipc{ipc}"] = {
                "beats_random_fidelity": w["fidelity"] > rnd["fidelity"],
                "beats_random_accuracy": w["accuracy"] > rnd["accuracy"],
                "fidelity_difference_in_random_std": (w["fidelity"] - rnd["fidelity"]) / max(rnd["fidelity_std"], 1e-12)}
    print("WMDD vs random:", verdict)
    paired_summary = []
    for ipc in args.ipcs:
        for method in dict.fromkeys(p["method"] for p in paired or []):
            sel = [p for p in paired if p["ipc"] == ipc and p["method"] == method]
            if not sel:
                continue
            gf, ga = [p["fidelity_gain"] for p in sel], [p["accuracy_gain"] for p in sel]
            paired_summary.append({"ipc": ipc, "method": method, "seeds": len(sel),
                                   "fidelity_gain": statistics.mean(gf), "fidelity_gain_std": statistics.pstdev(gf),
                                   "seeds_fidelity_up": sum(g > 0 for g in gf), "accuracy_gain": statistics.mean(ga),
                                   "accuracy_gain_std": statistics.pstdev(ga), "seeds_accuracy_up": sum(g > 0 for g in ga)})
    if paired_summary:
        print("\nWMDD against the random real subset it started from (same seed):")
        print(table(paired_summary, [("ipc", "IPC", "{}"), ("method", "method", ""), ("seeds", "seeds", "{}"),
                                     ("fidelity_gain", "Δ fidelity", "{:+.4f}"), ("fidelity_gain_std", "±", "{:.4f}"),
                                     ("seeds_fidelity_up", "seeds up", "{}"), ("accuracy_gain", "Δ accuracy", "{:+.4f}"),
                                     ("accuracy_gain_std", "±", "{:.4f}"), ("seeds_accuracy_up", "seeds up", "{}")]))
    wmdd_image_figure(tr, RESULTS / "distill_wmdd_images.png")
    write_json("distill.json", {"machine": machine(), "teacher_val_accuracy": teacher_acc, "teacher_checksum": ck,
                                "wmdd_iterations": args.iterations,
                                "student_epochs": args.student_epochs, "rows": results, "summary": summary,
                                "verdict": verdict, "paired": paired, "paired_summary": paired_summary,
                                "partial": False})


NAMES = {"random": "random", "kcenter": "k-center", "wmdd": "WMDD {it} it.", "wmdd-official": "WMDD {it:,} it., WMDD's lr/r_bn",
         "wmdd-lr05": "WMDD {it:,} it., ours"}


def render(d: dict) -> str:
    """The benchmarks page's stage-1 table (block ``distill-table``) from distill.json: one row per IPC and method
    (means ± population std over the seeds), the all-real reference, and each WMDD set against the random real
    subsets (Welch's t) and against the very subset it started from (``paired_summary``)."""
    summ = d["summary"]
    who = (f"teacher {d['teacher_checksum'][:12]}, {d['teacher_val_accuracy']:.1%} test accuracy, its epoch chosen on "
           "held-out training images" if d.get("teacher_checksum") else
           f"teacher {d['teacher_val_accuracy']:.1%} on the test split it was selected on (before #28)")
    lines = [f"`python3 benchmarks/bench_distill.py` ({who}; students {d['student_epochs']} epochs; "
             "`benchmarks/results/distill.json`):", "",
             "| IPC | m | method | seeds | KRR fidelity | KRR accuracy | student acc. (fixed / relabelled) | distill time |",
             "|---|---|---|---|---|---|---|---|"]
    for r in summ:
        if r["ipc"] is None:
            lines.append(f"| – | {r['m']:,} | {r['method']} | 1 | {r['fidelity']:.4f} | {r['accuracy']:.4f} | "
                         f"(teacher {r['student_accuracy']:.3f}) | – |")
            continue
        name = NAMES.get(r["method"], r["method"]).format(it=r.get("wmdd_iterations") or 0)
        where = "CPU" if r["distill_device"] == "cpu" else r["distill_device"].replace("NVIDIA ", "")
        lines.append(f"| {r['ipc']} | {r['m']} | {name} | {r['seeds']} | {r['fidelity']:.4f} ± {r['fidelity_std']:.4f} | "
                     f"{r['accuracy']:.4f} ± {r['accuracy_std']:.4f} | {r['student_accuracy']:.3f} / "
                     f"{r['student_accuracy_relabel']:.3f} | {r['distill_seconds']:.0f} s {where} |")
    lines += ["", "WMDD against random real subsets (difference of means, Welch's t over the seeds) and against the "
              "random subset each WMDD set was initialised from (mean paired gain ± std, seeds up):", ""]
    lines += ["| IPC | method | Δ fidelity vs random | Welch t | paired Δ fidelity | seeds up | Δ accuracy vs random |",
              "|---|---|---|---|---|---|---|"]
    paired = {(p["ipc"], p["method"]): p for p in d.get("paired_summary") or []}
    for r in summ:
        if r["ipc"] is None or not r["method"].startswith("wmdd"):
            continue
        rnd = next(x for x in summ if x["ipc"] == r["ipc"] and x["method"] == "random")
        se = (r["fidelity_std"] ** 2 / max(r["seeds"] - 1, 1) + rnd["fidelity_std"] ** 2 / max(rnd["seeds"] - 1, 1)) ** 0.5
        t = (r["fidelity"] - rnd["fidelity"]) / se if se > 0 else float("nan")
        p = paired.get((r["ipc"], r["method"]))
        name = NAMES.get(r["method"], r["method"]).format(it=r.get("wmdd_iterations") or 0)
        lines.append(f"| {r['ipc']} | {name} | {r['fidelity'] - rnd['fidelity']:+.4f} | {t:.1f} | "
                     + (f"{p['fidelity_gain']:+.4f} ± {p['fidelity_gain_std']:.4f} | {p['seeds_fidelity_up']} of {p['seeds']}"
                        if p else "– | –") + f" | {r['accuracy'] - rnd['accuracy']:+.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
