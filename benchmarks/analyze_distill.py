"""Why WMDD barely moves the kernel model: how much can *choosing* m real images well buy at all?

Usage:  python benchmarks/analyze_distill.py [--ipcs 10 50] [--seeds 0 1 2]

Same teacher, features and KRR as bench_distill.py (tensorsketch k = 4096 projected NTK features,
per-class KRR on teacher logits, ridge 1e-4, fidelity/accuracy on all 3,925 val images). Each row
picks IPC real training images per class, the image nearest to each k-means centre (one image per
centre, by optimal assignment) in a given space, and fits the kernel model on them:

- ``random``: a random subset (the baseline of bench_distill.py);
- ``penultimate``: the teacher's 512-d penultimate features, the space WMDD's barycenter lives in;
- ``barycenter``: WMDD's own free-support Wasserstein barycenter (POT) in that space;
- ``pooled activations``: globally pooled outputs of the stem and all four stages (forward only);
- ``teacher margin``: random among the 30% of the class with the smallest top-1 − top-2 logit gap
  (hard examples, forward passes only);
- ``NTK features (oracle)``: the projected per-logit gradients of *all* 9,469 training images — what
  a kernel model can only know after computing every Jacobian that distillation is meant to save;
- ``kernel-model error (oracle)``: half the images at random, then two rounds that add the training
  images the kernel model fitted so far gets most wrong (teacher-argmax disagreements first, then
  logit error) — a kernel-aware choice, again needing every Jacobian.

If the representative-point rows (k-means, barycenter) are within noise of ``random`` while the
kernel-error row is not, matching the real distribution is the wrong objective for this metric. Writes benchmarks/results/distill_analysis.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from sklearn.cluster import KMeans

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gradients import features, teacher_and_data  # noqa: E402
from common import machine, table, write_json  # noqa: E402

from dntk.distill.wmdd import barycenter, class_features  # noqa: E402
from dntk.kernels import PerClassKRR, fit_evaluate  # noqa: E402
from dntk.store import model_checksum  # noqa: E402
from dntk.training import evaluate  # noqa: E402


def pooled_activations(model, X, batch=256) -> torch.Tensor:
    """[n, Σ channels]: global-average-pooled stem and stage outputs, each block scaled to unit mean norm."""
    names = [n for n in ("conv1", "layer1", "layer2", "layer3", "layer4") if hasattr(model, n)]
    acts = {n: [] for n in names}
    hooks = [getattr(model, n).register_forward_hook(lambda m, i, o, n=n: acts[n].append(o.mean((2, 3))))
             for n in names]
    try:
        with torch.no_grad():
            for s in range(0, len(X), batch):
                model(X[s:s + batch])
    finally:
        for h in hooks:
            h.remove()
    blocks = [torch.cat(acts[n]) for n in names]
    return torch.cat([b / b.norm(dim=1).mean() for b in blocks], 1)


def nearest_to_centres(centres: np.ndarray, points: np.ndarray) -> torch.Tensor:
    """One distinct point per centre, minimising the total distance (Hungarian)."""
    _, cols = linear_sum_assignment(torch.cdist(torch.as_tensor(centres).double(),
                                                torch.as_tensor(points).double()).numpy())
    return torch.as_tensor(cols)


def error_driven(F, L, y, ipc, seed, rounds=2) -> torch.Tensor:
    """ipc // 2 random images per class, then ``rounds`` rounds adding, per class, the training images
    whose kernel-model prediction disagrees most with the teacher (argmax disagreement, then squared
    logit error). F: [C, n, k] features of all training images, L: [n, C] teacher logits."""
    C = L.shape[1]
    g = torch.Generator().manual_seed(seed)
    members = [torch.nonzero(y == c).flatten() for c in range(C)]
    idx = torch.cat([m[torch.randperm(len(m), generator=g)[:ipc // 2]] for m in members])
    rest = ipc - ipc // 2
    for r in range(rounds):
        model = PerClassKRR(ridge=1e-4).fit(F[:, idx], L[idx])
        pred = torch.cat([model.predict(F[:, s:s + 2048]) for s in range(0, F.shape[1], 2048)])
        err = ((pred - L) ** 2).sum(1) + 1e6 * (pred.argmax(1) != L.argmax(1)).to(pred.dtype)
        err[idx] = -1.0
        take = rest // rounds + (1 if r < rest % rounds else 0)
        idx = torch.cat([idx] + [m[torch.argsort(err[m], descending=True)[:take]] for m in members])
    return idx


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ipcs", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    torch.set_num_threads(2)
    teacher, tr, te = teacher_and_data()
    X, y = tr.tensors()
    real = features(teacher, X, "train-all")      # the same store bench_distill.py and bench_select.py fill
    fte = features(teacher, te.tensors()[0], "val")
    F, L = real.features, real.logits
    C = tr.num_classes
    top2 = L.topk(2, dim=1).values
    margin = top2[:, 0] - top2[:, 1]
    spaces = {"penultimate": class_features(teacher, X), "pooled activations": pooled_activations(teacher, X)}

    def score(index):
        return fit_evaluate(real.subset(index), L[index], fte, fte.logits, te.labels, ridge=1e-4)

    rows = []
    for ipc in args.ipcs:
        per = {}
        for seed in args.seeds:
            g = torch.Generator().manual_seed(seed)              # the same random subsets as bench_distill.py
            g_margin = torch.Generator().manual_seed(10_000 + seed)
            picks = {k: [] for k in ("random", "penultimate", "barycenter", "pooled activations", "teacher margin",
                                     "NTK features (oracle)")}
            for c in range(C):
                idx = torch.nonzero(y == c).flatten()
                picks["random"].append(idx[torch.randperm(len(idx), generator=g)[:ipc]])
                for name, S in spaces.items():
                    z = S[idx].double().numpy()
                    km = KMeans(ipc, n_init=1, random_state=seed).fit(z)
                    picks[name].append(idx[nearest_to_centres(km.cluster_centers_, z)])
                hard = idx[torch.argsort(margin[idx])[: max(ipc, int(0.3 * len(idx)))]]
                picks["teacher margin"].append(hard[torch.randperm(len(hard), generator=g_margin)[:ipc]])
                pen = spaces["penultimate"][idx]
                Z = barycenter(pen, ipc, seed=seed * 1000 + c)
                picks["barycenter"].append(idx[nearest_to_centres(Z.numpy(), pen.numpy())])
                # every logit's gradient features of the image, reduced to 128 principal components
                ntk = F[:, idx].permute(1, 0, 2).reshape(len(idx), -1).double()
                torch.manual_seed(seed * 1000 + c)                 # pca_lowrank draws from the global RNG
                U, S_, _ = torch.pca_lowrank(ntk, q=min(128, len(idx)), center=False)
                z = (U * S_).numpy()
                km = KMeans(ipc, n_init=1, random_state=seed).fit(z)
                picks["NTK features (oracle)"].append(idx[nearest_to_centres(km.cluster_centers_, z)])
            picks["kernel-model error (oracle)"] = [error_driven(F, L, y, ipc, seed)]
            for name, v in picks.items():
                per.setdefault(name, []).append(score(torch.cat(v)))
            print(f"ipc {ipc} seed {seed} done", flush=True)
        base = per["random"]
        for name, vals in per.items():
            row = {"ipc": ipc, "m": ipc * C, "selection": name, "seeds": len(vals)}
            for key in ("fidelity", "accuracy", "mse"):
                xs = [v[key] for v in vals]
                row[key], row[f"{key}_std"] = statistics.mean(xs), statistics.pstdev(xs)
            row["fidelity_gain_over_random"] = row["fidelity"] - statistics.mean(v["fidelity"] for v in base)
            rows.append(row)
    ref = score(torch.arange(len(y)))
    rows.append({"ipc": None, "m": len(y), "selection": "all real images", "seeds": 1, **ref})
    cols = [("ipc", "IPC", "{}"), ("m", "m", "{}"), ("selection", "real images chosen by", ""),
            ("fidelity", "KRR fidelity", "{:.4f}"), ("fidelity_std", "±", "{:.4f}"),
            ("fidelity_gain_over_random", "gain vs random", "{:+.4f}"), ("accuracy", "KRR accuracy", "{:.4f}"),
            ("accuracy_std", "±", "{:.4f}"), ("mse", "logit MSE", "{:.3f}")]
    print(table(rows, cols))
    write_json("distill_analysis.json", {"machine": machine(), "teacher_checksum": model_checksum(teacher),
                                         "teacher_test_accuracy": evaluate(teacher, te)[0], "rows": rows})


LABELS = {"random": "random", "penultimate": "nearest k-means centres, penultimate features (WMDD's space)",
          "barycenter": "nearest WMDD's barycenter points",
          "pooled activations": "nearest k-means centres, pooled activations of every stage",
          "teacher margin": "smallest teacher margin (hard examples)",
          "NTK features (oracle)": "nearest k-means centres, NTK features of all training images (oracle)",
          "kernel-model error (oracle)": "images the kernel model gets most wrong (oracle, kernel-aware)"}


def render(d: dict) -> str:
    """The benchmarks page's table of ways to pick real images (block ``distill-analysis-table``) from
    distill_analysis.json: fidelity per IPC, and its gain over a random pick."""
    rows = [r for r in d["rows"] if r["ipc"] is not None]
    ipcs = sorted({r["ipc"] for r in rows})
    who = (f"teacher {d['teacher_checksum'][:12]}, {d['teacher_test_accuracy']:.1%} test accuracy; "
           if d.get("teacher_checksum") else "")
    lines = [f"`python3 benchmarks/analyze_distill.py --seeds 0 1 2 3 4 5` ({who}"
             f"`benchmarks/results/distill_analysis.json`; {max(r['seeds'] for r in rows)} seeds):", "",
             "| real images chosen by | " + " | ".join(f"IPC {i} fidelity (gain vs random)" for i in ipcs) + " |",
             "|---|" + "---|" * len(ipcs)]
    for name in dict.fromkeys(r["selection"] for r in rows):
        cells = []
        for i in ipcs:
            r = next((x for x in rows if x["ipc"] == i and x["selection"] == name), None)
            cells.append("–" if r is None else f"{r['fidelity']:.4f}" + (
                "" if name == "random" else f" ({r['fidelity_gain_over_random']:+.4f})"))
        lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    real = next((r for r in d["rows"] if r["ipc"] is None), None)
    acc = [r["accuracy"] for r in rows if r["ipc"] == max(ipcs)]
    if real:
        lines += ["", f"KRR accuracy at IPC {max(ipcs)} over every choice: {min(acc):.3f}–{max(acc):.3f}, against "
                  f"{real['accuracy']:.3f} with all {real['m']:,} real images."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
