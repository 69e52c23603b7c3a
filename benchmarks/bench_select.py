"""Kernel-aware stage 1 against a random real subset: does choosing the m images by the kernel model's
own error beat random photos, and what does it cost?

Usage:  python benchmarks/bench_select.py [--ipcs 10 50] [--seeds 0 1 2 3 4 5] [--pool-factors 2 4]

Teacher, features and kernel model as bench_gradients.py / bench_distill.py: ResNet-18 (ImageNet stem,
64 px, all 9,469 ImageNette training images), tensorsketch k = 4096 projected per-logit gradients,
trace-normalised per-class KRR on teacher logits, ridge 1e-4, evaluated on all 3,925 val images.

For each IPC and seed: ``random`` is the library's ``--distill random`` subset; ``kernel-greedy (p)`` and
``kernel-herding (p)`` choose IPC images per class from a pool of p × IPC (the random subset plus
(p − 1) × IPC more random images of the same seeded permutation — the two are paired) with
``dntk.distill.select_kernel_aware``. Its Jacobian cost is the pool: p × m images × C logits. The
pool's features are read from a store of all training images' features (a cache, so the seeds and
pool sizes share one extraction); the library computes exactly the pool's when run on its own
(`dntk distill --distill kernel-greedy`, tested in tests/test_kernel_select.py).

Metrics per row: fidelity / accuracy / MSE of the kernel model on teacher logits; the same chosen
points on targets the selection never saw — one-hot labels (accuracy) and the logits of a second
network (the 15-epoch student of bench_gradients.py: fidelity to its argmax, MSE to its logits).
Summary: mean ± std over seeds and Welch's t of each method against ``random`` (target: t ≥ 2 at
IPC 10 and 50 with ≥ 6 seeds). Writes benchmarks/results/select.json.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gradients import DATA, ROOT, TEACHER, features, teacher_and_data  # noqa: E402
from common import RESULTS, machine, table, write_json, write_readme_block  # noqa: E402

import dntk  # noqa: E402
from dntk.distill import pool_indices, select_kernel_aware, select_real  # noqa: E402
from dntk.kernels import fit_evaluate, one_hot  # noqa: E402
from dntk.spectral import energy_gap, second_moment_spectrum, top_pca_directions  # noqa: E402
from dntk.training import build_network, evaluate  # noqa: E402


def welch_t(a: list[float], b: list[float]) -> float:
    """(mean a − mean b) / sqrt(var_a/n_a + var_b/n_b), sample variances."""
    va, vb = statistics.variance(a), statistics.variance(b)
    se = math.sqrt(va / len(a) + vb / len(b))
    return (statistics.mean(a) - statistics.mean(b)) / se if se > 0 else float("inf")


def second_network(te):
    """The 15-epoch student of bench_gradients.py (trained on 500 random real images), if cached."""
    found = sorted(ROOT.glob("bench-student-heldout-*/best.pt"))
    if not found:
        return None
    net = build_network(TEACHER, DATA.dataset, DATA.image_size, te)
    net.load_state_dict(dntk.store.load(found[0])["model"])
    return net.eval()


def _t(v) -> str:
    return "" if v is None else f" ({v:+.1f})"


def render(d: dict) -> tuple[str, str]:
    """The README's two stage-1 tables from select.json's summary: the selection table (KRR fidelity
    with Welch's t against random and seeds up; held-out measures with their t) and Proposition 3.6's
    decomposition per subspace (between the README's <!-- select-table --> / <!-- gap-table --> markers)."""
    rows = d["summary"]
    sel = ["| IPC | m | stage 1 | Jacobian images | KRR fidelity | Welch t | seeds up | KRR accuracy | "
           "one-hot-target acc. (t) | 2nd-network fidelity (t) | select s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "fidelity" not in r:
            continue
        t = "–" if r.get("t_fidelity") is None else f"{r['t_fidelity']:.1f}"
        up = "–" if r.get("seeds_fidelity_up") is None else str(r["seeds_fidelity_up"])
        sel.append(f"| {r['ipc']} | {r['m']} | {r['method']} | {r['jacobian_images']:,} | {r['fidelity']:.4f} ± "
                   f"{r['fidelity_std']:.4f} | {t} | {up} | {r['accuracy']:.4f} ± {r['accuracy_std']:.4f}"
                   f"{_t(r.get('t_accuracy'))} | {r['onehot_accuracy']:.4f}{_t(r.get('t_onehot_accuracy'))} | "
                   f"{r['student_target_fidelity']:.4f}{_t(r.get('t_student_target_fidelity'))} | "
                   f"{r['select_seconds']:.1f} |")
    gap = ["| IPC | subspace V | tr((I−Π_V)Σ_g)/tr Σ_g, train | PCA tail | gap | held-out residual | held-out gap |",
           "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "train_gap" in r:
            gap.append(f"| {r['ipc']} | {r['method']} | {r['train_residual']:.4f} | {r['train_pca_tail']:.4f} | "
                       f"{r['train_gap']:.4f} | {r['val_residual']:.4f} | {r['val_gap']:.4f} |")
    return "\n".join(sel), "\n".join(gap)


def write_readme(d: dict) -> bool:
    sel, gap = render(d)
    return write_readme_block("select-table", sel) and write_readme_block("gap-table", gap)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ipcs", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5])
    ap.add_argument("--pool-factors", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--herding", action="store_true", help="also kernel-herding (posterior variance)")
    ap.add_argument("--ridge", type=float, default=1e-4)
    ap.add_argument("--rows-from", default=None,
                    help="reuse the per-seed rows of a select.json (e.g. an interrupted run's) and only summarise")
    ap.add_argument("--no-energy-gap", dest="energy_gap", action="store_false",
                    help="skip Proposition 3.6's decomposition per row")
    ap.add_argument("--render", action="store_true", help="only write the README's tables from select.json")
    args = ap.parse_args()
    if args.render:
        import json
        print("README updated" if write_readme(json.loads((RESULTS / "select.json").read_text()))
              else "README has no <!-- select-table --> / <!-- gap-table --> markers")
        return
    torch.set_num_threads(2)
    teacher, tr, te = teacher_and_data()
    X, y = tr.tensors()
    real = features(teacher, X, "train-all")          # cache of every training image's features
    fte = features(teacher, te.tensors()[0], "val")
    proj = dntk.projection.make("tensorsketch", k=4096, seed=0)
    C = tr.num_classes
    teacher_acc = evaluate(teacher, te)[0]
    other = second_network(te)
    if other is not None:
        with torch.no_grad():
            other_train = torch.cat([other(X[s:s + 512]) for s in range(0, len(X), 512)]).double()
        other_acc, other_test = evaluate(other, te)
        other_test = other_test.double()

    # Proposition 3.6 / Theorem 3.3 per class: Σ_g of all training images (in-sample) and of the val images
    # (held-out); V = span of the chosen points' features. Spectra depend on Σ_g only: computed once.
    spectra = {}

    def energy(index):
        out = {}
        for split, Fs in (("train", real.features), ("val", fte.features)):
            res = []
            for c in range(C):
                G = Fs[c].double()
                if (split, c) not in spectra:
                    spectra[(split, c)] = second_moment_spectrum(G)
                res.append(energy_gap(G, real.features[c][index].double(), spectrum=spectra[(split, c)]))
            for key in ("residual", "pca_tail", "gap"):
                out[f"{split}_{key}"] = statistics.mean(r[key] for r in res)
        return out

    def score(index):
        index = torch.as_tensor(index)
        sub = real.subset(index)
        row = fit_evaluate(sub, sub.logits, fte, fte.logits, te.labels, ridge=args.ridge)
        lab = fit_evaluate(sub, one_hot(y[index], C), fte, fte.logits, te.labels, ridge=args.ridge,
                           targets_test=one_hot(te.labels, C))
        row["onehot_accuracy"], row["onehot_mse"] = lab["accuracy"], lab["mse"]
        if other is not None:
            o = fit_evaluate(sub, other_train[index], fte, other_test, te.labels, ridge=args.ridge)
            row["student_target_fidelity"], row["student_target_mse"] = o["fidelity"], o["mse"]
        if args.energy_gap:
            row.update(energy(index))
        return row

    methods = [("random", 1)] + [("kernel-greedy", p) for p in args.pool_factors]
    if args.herding:
        methods += [("kernel-herding", p) for p in args.pool_factors]
    rows = []
    if args.rows_from:
        import json
        rows = [r for r in json.loads(Path(args.rows_from).read_text())["rows"] if r.get("pool") is not None]
        for split, Fs in (("train", real.features), ("val", fte.features)):   # spectra for the PCA rows
            for c in range(C):
                spectra[(split, c)] = second_moment_spectrum(Fs[c].double())
    for ipc in ([] if args.rows_from else args.ipcs):
        for seed in args.seeds:
            for method, p in methods:
                t0 = time.perf_counter()
                if method == "random":
                    ds_index = torch.tensor(select_real_indices(tr, ipc, seed))
                    cost, sel_s = 0, 0.0
                else:
                    pool = pool_indices(tr, ipc, p, seed)
                    ds = select_kernel_aware(tr, ipc, method, teacher=teacher, projector=proj, pool_factor=p,
                                             ridge=args.ridge, seed=seed, pool_features=real.subset(pool),
                                             progress=False, out_dir=ROOT / f"select-{method}-p{p}-ipc{ipc}-seed{seed}")
                    ds_index = torch.tensor(_manifest(ROOT / f"select-{method}-p{p}-ipc{ipc}-seed{seed}")["indices"])
                    assert torch.equal(X[ds_index], ds.images)
                    cost, sel_s = len(pool), time.perf_counter() - t0
                row = {"ipc": ipc, "m": ipc * C, "method": method if method == "random" else f"{method} (p={p})",
                       "seed": seed, "pool": cost, "jacobian_images": max(cost, ipc * C),
                       "select_seconds": sel_s, **score(ds_index)}
                rows.append(row)
                print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            write_json("select.json", {"machine": machine(), "rows": rows, "partial": True})
    if args.energy_gap:   # (d) the top-d PCA directions of the training Σ_g: zero gap in-sample by construction
        tops = {c: top_pca_directions(real.features[c], max(args.ipcs) * C) for c in range(C)}
        for ipc in args.ipcs:
            res = {"train": [], "val": []}
            for c in range(C):
                top = tops[c][:ipc * C]
                for split, Fs in (("train", real.features), ("val", fte.features)):
                    res[split].append(energy_gap(Fs[c].double(), top, spectrum=spectra[(split, c)]))
            rows.append({"ipc": ipc, "m": ipc * C, "method": "top-m PCA of Σ_g (not images)", "seed": 0, "pool": None,
                         "jacobian_images": len(X), **{f"{sp}_{k}": statistics.mean(r[k] for r in res[sp])
                                                       for sp in res for k in ("residual", "pca_tail", "gap")}})
    keys = ("fidelity", "accuracy", "mse", "onehot_accuracy", "student_target_fidelity", "student_target_mse",
            "select_seconds", "train_residual", "train_pca_tail", "train_gap", "val_residual", "val_pca_tail", "val_gap")
    summary = []
    for ipc in args.ipcs:
        base = [r for r in rows if r["ipc"] == ipc and r["method"] == "random"]
        for name in dict.fromkeys(r["method"] for r in rows):
            sel = [r for r in rows if r["ipc"] == ipc and r["method"] == name]
            out = {"ipc": ipc, "m": sel[0]["m"], "method": name, "seeds": len(sel), "pool": sel[0]["pool"],
                   "jacobian_images": sel[0]["jacobian_images"]}
            for k in keys:
                vals = [r[k] for r in sel if r.get(k) is not None]
                if vals:
                    out[k], out[f"{k}_std"] = statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0
            if name != "random" and len(sel) > 1 and "fidelity" in sel[0]:
                for k in ("fidelity", "accuracy", "onehot_accuracy", "student_target_fidelity"):
                    if k in out:
                        out[f"t_{k}"] = welch_t([r[k] for r in sel], [r[k] for r in base])
                out["seeds_fidelity_up"] = sum(a["fidelity"] > b["fidelity"] for a, b in zip(sel, base))
            summary.append(out)
    cols = [("ipc", "IPC", "{}"), ("m", "m", "{}"), ("method", "method", ""), ("seeds", "seeds", "{}"),
            ("jacobian_images", "Jacobian images", "{}"), ("fidelity", "fidelity", "{:.4f}"), ("fidelity_std", "±", "{:.4f}"),
            ("t_fidelity", "Welch t", "{:.1f}"), ("seeds_fidelity_up", "seeds up", "{}"),
            ("accuracy", "accuracy", "{:.4f}"), ("t_accuracy", "t", "{:.1f}"), ("mse", "logit MSE", "{:.3f}"),
            ("onehot_accuracy", "one-hot acc.", "{:.4f}"), ("t_onehot_accuracy", "t", "{:.1f}"),
            ("student_target_fidelity", "2nd-net fid.", "{:.4f}"), ("t_student_target_fidelity", "t", "{:.1f}"),
            ("select_seconds", "select s", "{:.1f}")]
    gap_cols = [("ipc", "IPC", "{}"), ("method", "method", ""), ("train_residual", "tr((I−Π)Σ)/trΣ train", "{:.4f}"),
                ("train_pca_tail", "PCA tail", "{:.4f}"), ("train_gap", "gap", "{:.4f}"),
                ("val_residual", "held-out residual", "{:.4f}"), ("val_pca_tail", "held-out PCA tail", "{:.4f}"),
                ("val_gap", "held-out gap", "{:.4f}")]
    print(f"\nteacher val accuracy {teacher_acc:.4f}; seeds {args.seeds}; second network "
          f"{'val acc %.4f' % other_acc if other is not None else 'missing'}")
    print(table(summary, cols))
    if args.energy_gap:
        print("\nProposition 3.6 per class (mean over classes and seeds; fractions of tr Σ_g; Σ_g of all training / val images):")
        print(table(summary, gap_cols))
    write_json("select.json", {"machine": machine(), "teacher_val_accuracy": teacher_acc,
                               "second_network_val_accuracy": other_acc if other is not None else None,
                               "ridge": args.ridge, "rows": rows, "summary": summary, "partial": False})


def select_real_indices(tr, ipc, seed):
    """The dataset indices of ``--distill random`` for this seed: a pool of factor 1 (the same seeded
    permutation), checked against the library's images."""
    idx = pool_indices(tr, ipc, 1, seed)
    assert torch.equal(tr.tensors(idx)[0], select_real(tr, ipc, "random", seed=seed).images)
    return idx.tolist()


def _manifest(folder):
    import json
    return json.loads((Path(folder) / "manifest.json").read_text())


if __name__ == "__main__":
    main()
