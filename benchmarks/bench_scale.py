"""Past one process: `dntk run` under torchrun (1 and 2 CPU processes) and streamed versus stored
evaluation as the test set grows ×4.

Usage:  python benchmarks/bench_scale.py [--m 1000] [--n-tests 500 2000] [--k 4096]

Every configuration is one real `dntk run` (or `torchrun --nproc-per-node N -m dntk run`) on the full
ImageNette split at 32 px with the small CNN (a teacher trained for 2 epochs once, passed by
--checkpoint, so every run analyses the same network), in a fresh output folder:

- scaling: m training + n_test test images through the feature store by 1 process × 2 threads,
  1 process × 1 thread and 2 processes × 1 thread (on 2 cores the two processes share the cores, so
  parallel efficiency is reported as measured); throughput = (m + n_test)·C per-sample per-logit
  gradients per second of the extraction stages, rank 0's peak RSS; the features and results of the
  2-process run are compared with the 1-process run's;
- evaluation: --test-features store versus stream at n_test and 4·n_test (1 process): peak RSS and
  the kernel-model metrics (must agree), so the memory of streaming stays flat while the stored
  features grow with n_test.
- with a GPU: one GPU at 160 px (ResNet-18, ImageNet stem, 10 logits, k = 4096) and the cost of a full
  9,469 + 3,925 ImageNette run extrapolated from its throughput. Without one, the row says so.

Writes benchmarks/results/scale.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import SHARED, machine, table, write_json  # noqa: E402

from dntk.store import FeatureStore  # noqa: E402

WORK = HERE.parent / "runs" / "scale"
DATA = ["--dataset", "folder", "--data-root", str(SHARED / "imagenette2-224"), "--image-size", "32", "--model",
        "small_cnn"]


def dntk(args, out: Path, procs: int = 1, threads: int = 2) -> tuple[dict, float]:
    """One `dntk run` in a fresh folder sharing the decoded-image cache; (results.json, wall seconds)."""
    out.mkdir(parents=True, exist_ok=True)
    cache = WORK / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    if not (out / "cache").exists():
        (out / "cache").symlink_to(cache)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    launcher = [sys.executable, "-m", "dntk"] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs), "-m", "dntk"]
    t = time.perf_counter()
    r = subprocess.run([*launcher, "run", *args, "--out", str(out), "--quiet"], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"dntk run failed in {out}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return json.loads((out / "results.json").read_text()), wall


def store_of(out: Path, tag: str) -> FeatureStore:
    (folder,) = [p for p in out.glob(f"features-{tag}-*") if p.is_dir()]
    return FeatureStore(folder)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--m", type=int, default=1000)
    ap.add_argument("--n-tests", type=int, nargs=2, default=[500, 2000])
    ap.add_argument("--k", type=int, default=4096)
    args = ap.parse_args()
    stamp = time.strftime("%Y%m%d-%H%M%S")
    root = WORK / stamp
    # the analysed network: a small CNN trained for 2 epochs, once
    teacher_dir = WORK / "teacher"
    if not (teacher_dir / "teacher" / "best.pt").exists():
        r = subprocess.run([sys.executable, "-m", "dntk", "train", *DATA, "--epochs", "2", "--out", str(teacher_dir),
                            "--quiet"], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(r.stderr[-3000:])
    common = [*DATA, "--checkpoint", str(teacher_dir / "teacher" / "best.pt"), "--k", str(args.k),
              "--train-points", str(args.m), "--feature-chunk", "256", "--m-grid", str(args.m)]

    # -- 1 and 2 processes --------------------------------------------------------------------------
    n_test = args.n_tests[0]
    rows, results = [], {}
    for label, procs, threads in (("1 process × 2 threads", 1, 2), ("1 process × 1 thread", 1, 1),
                                  ("2 processes × 1 thread", 2, 1)):
        out = root / f"procs{procs}-threads{threads}"
        res, wall = dntk([*common, "--n-test", str(n_test)], out, procs, threads)
        t = res["timings_s"]
        seconds = t["features_train"] + t["features_test"]
        C = res["counts"]["classes"]
        rows.append({"setting": label, "processes": procs, "threads": threads, "images": args.m + n_test,
                     "extraction_s": seconds, "throughput": (args.m + n_test) * C / seconds, "wall_s": wall,
                     "rank0_peak_mb": res["peak_memory_mb"], "fidelity": res["kernel_model"]["fidelity"],
                     "mse": res["kernel_model"]["mse"]})
        results[label] = (out, res)
        print(json.dumps(rows[-1]), flush=True)
    one, two = results["1 process × 1 thread"][0], results["2 processes × 1 thread"][0]
    same = {tag: bool(torch.equal(store_of(one, tag).read().features, store_of(two, tag).read().features))
            for tag in ("train", "test")}
    ref2 = results["1 process × 2 threads"][0]
    rel = {tag: float((store_of(ref2, tag).read().features - store_of(two, tag).read().features).norm()
                      / store_of(ref2, tag).read().features.norm()) for tag in ("train", "test")}
    base = next(r for r in rows if r["setting"] == "1 process × 2 threads")["throughput"]
    for r in rows:
        r["speed_vs_1x2"] = r["throughput"] / base

    # -- stored versus streamed evaluation ------------------------------------------------------------
    eval_rows = []
    for n in args.n_tests:
        for mode in ("store", "stream"):
            out = root / f"eval-{mode}-{n}"
            res, wall = dntk([*common, "--n-test", str(n), "--test-features", mode], out, 1, 2)
            stored_bytes = sum(p.stat().st_size for p in out.glob("features-test-*/*.npy"))
            eval_rows.append({"n_test": n, "test_features": mode, "peak_mb": res["peak_memory_mb"], "wall_s": wall,
                              "test_feature_bytes_on_disk": stored_bytes, "fidelity": res["kernel_model"]["fidelity"],
                              "mse": res["kernel_model"]["mse"]})
            print(json.dumps(eval_rows[-1]), flush=True)
    growth = {mode: [r["peak_mb"] for r in eval_rows if r["test_features"] == mode] for mode in ("store", "stream")}

    # -- one GPU at 160 px -------------------------------------------------------------------------------
    gpu = {"available": torch.cuda.is_available()}
    if gpu["available"]:
        out = root / "gpu160"
        gpu_args = ["--dataset", "folder", "--data-root", str(SHARED / "imagenette2-224"), "--image-size", "160",
                    "--stem", "imagenet", "--model", "resnet18", "--epochs", "1", "--k", "4096", "--train-points", "500",
                    "--n-test", "500", "--device", "cuda"]
        res, wall = dntk(gpu_args, out, 1, 8)
        t = res["timings_s"]
        seconds = t["features_train"] + t["features_test"]
        per_s = 1000 / seconds
        gpu.update({"device": torch.cuda.get_device_name(0), "images_per_s": per_s, "throughput": per_s * 10,
                    "full_imagenette_extraction_s": (9469 + 3925) / per_s, "peak_rss_mb": res["peak_memory_mb"]})

    print(f"\nscaling: m = {args.m} + n_test = {n_test} ImageNette images at 32 px, small CNN "
          f"(P = {results['1 process × 2 threads'][1]['counts']['parameters']:,}), k = {args.k}, C = 10")
    print(table(rows, [("setting", "setting", ""), ("extraction_s", "extraction s", "{:.1f}"),
                       ("throughput", "gradients/s", "{:.0f}"), ("speed_vs_1x2", "vs 1×2", "{:.2f}"),
                       ("rank0_peak_mb", "rank-0 peak MB", "{:.0f}"), ("fidelity", "fidelity", "{:.4f}"),
                       ("mse", "mse", "{:.5g}")]))
    print(f"features of 2 processes × 1 thread bit-identical to 1 process × 1 thread: {same}; relative "
          f"difference to 1 process × 2 threads: {rel}")
    print("\nevaluation: stored versus streamed test features (1 process × 2 threads)")
    print(table(eval_rows, [("n_test", "n_test", "{}"), ("test_features", "test features", ""),
                            ("peak_mb", "peak MB", "{:.0f}"),
                            ("test_feature_bytes_on_disk", "test features on disk (bytes)", "{:,}"),
                            ("fidelity", "fidelity", "{:.4f}"), ("mse", "mse", "{:.6g}"), ("wall_s", "wall s", "{:.0f}")]))
    print(f"peak MB as n_test grows ×4: store {growth['store']}, stream {growth['stream']}")
    print("GPU:", gpu if gpu["available"] else "no GPU on this machine: the 160 px row was not measured")
    write_json("scale.json", {"machine": machine(), "m": args.m, "k": args.k, "scaling": rows,
                              "bit_identical_1x1_vs_2x1": same, "relative_difference_vs_1x2": rel,
                              "evaluation": eval_rows, "peak_growth": growth, "gpu": gpu, "folder": str(root)})


def render(d: dict) -> str:
    """The benchmarks page's two tables (block ``scale-tables``) from scale.json: extraction across processes and
    threads, then stored against streamed evaluation as n_test grows, with what follows from them."""
    sc, ev, m = d["scaling"], d["evaluation"], d["machine"]
    lines = [f"`python3 benchmarks/bench_scale.py` (m = {d['m']:,} training and {sc[0]['images'] - d['m']:,} test images, k = {d['k']}, a "
             f"{m['cores']}-core CPU, torch {m['torch']}; `benchmarks/results/scale.json`):", "",
             "| setting | extraction s | per-sample per-logit gradients / s | vs 1 × 2 threads | rank-0 peak MB |",
             "|---|---|---|---|---|"]
    for r in sc:
        ratio = f"{r['speed_vs_1x2']:.2f}"
        lines.append(f"| {r['setting']}{' (torchrun, gloo)' if r['processes'] > 1 else ''} | {r['extraction_s']:.1f} | "
                     f"{r['throughput']:.0f} | {'**' + ratio + '**' if r['processes'] > 1 else ratio} | {r['rank0_peak_mb']:.0f} |")
    one = next(r for r in sc if r["processes"] == 1 and r["threads"] == 1)
    two = next(r for r in sc if r["processes"] == 2)
    same = all(d["bit_identical_1x1_vs_2x1"].values())
    lines += ["", f"Against one single-threaded process, two processes' parallel efficiency is {two['throughput']:.0f} / "
              f"(2 · {one['throughput']:.0f}) = {two['throughput'] / (2 * one['throughput']):.2f}. The features of 2 processes "
              f"are {'bit-identical to' if same else 'not bit-identical to'} one process's (relative difference against "
              f"1 × 2 threads: train {d['relative_difference_vs_1x2']['train']:.1e}, test "
              f"{d['relative_difference_vs_1x2']['test']:.1e}).", "",
              "| n_test | `--test-features` | peak MB | test features on disk | fidelity | mse |", "|---|---|---|---|---|---|"]
    first = {r["test_features"]: r for r in ev if r["n_test"] == min(e["n_test"] for e in ev)}
    for r in ev:
        grow = r["peak_mb"] - first[r["test_features"]]["peak_mb"]
        disk = r["test_feature_bytes_on_disk"]
        peak = f"{r['peak_mb']:.0f}" + (f" ({grow:+.0f})" if grow else "")
        lines.append(f"| {r['n_test']:,} | {r['test_features']} | {peak} | {f'{disk / 1e6:.0f} MB' if disk else 0} | "
                     f"{r['fidelity']:.4f} | {r['mse']:.9f} |")
    pg = d["peak_growth"]
    n0, n1 = min(e["n_test"] for e in ev), max(e["n_test"] for e in ev)
    worst = max(abs(a["mse"] - b["mse"]) / abs(a["mse"]) for a in ev for b in ev
                if a["n_test"] == b["n_test"] and a is not b)
    lines += ["", f"For {n1 / n0:.0f}× the test images streaming's peak grows {pg['stream'][1] / pg['stream'][0] - 1:+.1%} "
              f"and storing's {pg['store'][1] / pg['store'][0] - 1:+.1%}, with the same metrics (mse equal to "
              f"{worst:.0e} relative)." + ("" if d["gpu"].get("available") else
                                           " No GPU was available to the run, so its GPU rows were not measured.")]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
