"""Stage 3 on full ImageNette at 64 px: Algorithm 1 versus selection baselines, spectra, coverage.

Usage:  python benchmarks/bench_gradients.py [--distilled DIR] [--full-grid]

Teacher: ResNet-18 (ImageNet stem, 64 px) trained on all 9,469 training images, cached in
runs/imagenette64/teacher (trained here first if missing: `dntk train --dataset folder --data-root
../shared/data/imagenette2-224 --image-size 64 --stem imagenet --epochs 14 --out runs/imagenette64`).
Training gradients: a distilled set from stage 1 when --distilled is given, otherwise a random real
subset of m = 500 (50 per class). Test: all 3,925 val images. Features: tensorsketch, k = 4096.

Prints and writes benchmarks/results/gradients.json and figures (figure2/3/4-tench/5, pareto):
fidelity, accuracy and MSE for Algorithm 1 (budget mode), four selection baselines, the target
direction and the hybrid at s = 1 and m/s = 20, 50, 100 (3 seeds, mean ± std), the same sets on targets
they never saw (one-hot labels, a GP-prior function) and kernel-level errors (Nyström, posterior
variance, principal angles), the per-class truncation ranks at ε = 0.05, the coverage gap, a (τ_v, τ_g, H)
grid with its Pareto frontier, and the paper's numbers beside ours.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, SHARED, machine, table, write_json, write_readme_block  # noqa: E402

import dntk  # noqa: E402
from dntk.config import DataConfig, TeacherConfig  # noqa: E402
from dntk.data import balanced_indices, load_configured  # noqa: E402
from dntk.gradient_distillation import GRADIENT_METHODS, budget_curves, compare_methods, grid_search  # noqa: E402
from dntk.kernels import fit_evaluate, rank_curve, shared_normalisation  # noqa: E402
from dntk.report import class_figure4, figure2, figure3, figure5, pareto_figure  # noqa: E402
from dntk.spectral import ALL_POINTS, OWN_CLASS, local_global_summary, spectral_summary  # noqa: E402
from dntk.store import FeatureStore, digest, model_checksum  # noqa: E402
from dntk.distill import DistilledSet  # noqa: E402
from dntk.training import build_network, evaluate, load_or_train_teacher, train_student  # noqa: E402

ROOT = Path(__file__).resolve().parents[1] / "runs" / "imagenette64"
PAPER = {"truncation_ranks": "31–41", "coverage_gap": "12–15%", "accuracy_at_100x": 0.76, "fidelity_at_100x": 0.78}


# the teacher every ImageNette benchmark uses: the library's teacher recipe at 64 px, ImageNet stem, 14 epochs
TEACHER = TeacherConfig(model="resnet18", stem="imagenet", epochs=14)
DATA = DataConfig(dataset="folder", data_root=str(SHARED / "imagenette2-224"), image_size=64)


def teacher_and_data(root=ROOT):
    """(teacher in eval mode, train split, val split); the teacher is trained once into root/teacher
    (`dntk train` with the same settings writes the same checkpoint) and reused after."""
    tr, te = load_configured(DATA, cache_dir=root / "cache", progress=True)
    teacher = load_or_train_teacher(TEACHER, DATA.dataset, DATA.image_size, tr, root, progress=True)
    return teacher.model, tr, te


def features(model, X, tag, k=4096, root=ROOT, progress=True):
    """The library's feature store (tensorsketch, k, seed 0) for inputs X, keyed by the model, k and X."""
    proj = dntk.projection.make("tensorsketch", k=k, seed=0)
    key = digest(model_checksum(model), k, digest(X))
    store = FeatureStore(root / f"bench-store-{tag}-{key}")
    store.extract(model, X, proj, progress=progress)
    return store.read(projector=proj)


def _pm(r, key, fmt):
    v, sd = r.get(key), r.get(f"{key}_std")
    if v is None:
        return "–"
    return fmt.format(v) + (f" ± {fmt.format(sd)}" if sd is not None and sd > 1e-9 else "")


def render(d: dict) -> str:
    """The README's stage-3 tables, from gradients.json (`--render` writes them between the README's
    <!-- gradients-tables --> markers)."""
    rows = d["rows"]
    order = sorted((r for r in rows if r["s"] > 1), key=lambda r: (-r["compression"], r["method"] != "local-global",
                                                                   r["method"]))
    full = d["kernel_model_all_m"]
    out = [f"Teacher {d['teacher_val_accuracy']:.4f} val accuracy; m = {d['m']} ({d['source']}), k = {d['k']}; "
           f"3 seeds (± where a method's seed changes its set); `benchmarks/results/gradients.json`.", "",
           "| m/s | s | method | fidelity | accuracy | MSE |", "|---|---|---|---|---|---|"]
    for r in order:
        out.append(f"| {r['compression']:.0f}× | {r['s']} | {r['method']} | {_pm(r, 'fidelity', '{:.3f}')} | "
                   f"{_pm(r, 'accuracy', '{:.3f}')} | {_pm(r, 'mse', '{:.3g}')} |")
    out.append(f"| 1× | {d['m']} | all m gradients | {full['fidelity']:.4f} | {full['accuracy']:.4f} | {full['mse']:.3g} |")
    own, every = d["ranks"][OWN_CLASS], d["ranks"][ALL_POINTS]
    gaps = [r["uncovered_variance_fraction"] for r in d["local_global"]]
    gap_sets = [r["gap_variance_fraction"] for r in d["local_global"]]
    lg100 = next((r for r in rows if r["method"] == "local-global" and round(r["compression"]) == 100), None)
    out += ["", "| | ours | paper |", "|---|---|---|",
            f"| truncation ranks at ε = 0.05, own-class blocks | {min(own)}–{max(own)} | {d['paper']['truncation_ranks']} |",
            f"| truncation ranks at ε = 0.05, per-logit kernel over all {d['m']} points | {min(every)}–{max(every)} | — |",
            f"| coverage gap (H = 10, τ_g = 0.9): variance in gap directions / uncovered variance | "
            f"{min(gap_sets):.1%}–{max(gap_sets):.1%} / {min(gaps):.1%}–{max(gaps):.1%} | {d['paper']['coverage_gap']} |"]
    if lg100:
        out.append(f"| Algorithm 1 at 100×: accuracy / fidelity | {lg100['accuracy']:.3f} / {lg100['fidelity']:.3f} | "
                   f"{d['paper']['accuracy_at_100x']} / {d['paper']['fidelity_at_100x']} |")
    unseen = sorted(rows, key=lambda r: (r["s"], r["method"] != "local-global", r["method"]))
    if any("nystrom_error" in r for r in rows):
        out += ["", "On what the sets did not see (mean over the seeds): refit on one-hot labels, on the student's logits "
                "and on a GP-prior function (argmax agreement with the all-m model on those targets), kernel-level "
                "errors on the test points, and the optimum lines (training-kernel error beside its Eckart–Young "
                "minimum; test Nyström error beside its oracle minimum and the share of the achievable reduction "
                "reached).", "",
                "| method | s | fidelity (built for) | labels: acc. | labels: agr. | student: agr. | GP: agr. | "
                "post. var. err. | cos² top-r | train kernel err. | Eckart–Young | Nyström err. | oracle | fraction |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in unseen:
            cells = [_pm(r, k, f) for k, f in (("fidelity", "{:.3f}"), ("onehot_accuracy", "{:.3f}"),
                                                ("onehot_agreement", "{:.3f}"), ("student_agreement", "{:.3f}"),
                                                ("gp_agreement", "{:.3f}"), ("posterior_variance_error", "{:.3g}"),
                                                ("principal_cos2", "{:.3f}"), ("train_kernel_error", "{:.3f}"),
                                                ("eckart_young", "{:.3f}"), ("nystrom_error", "{:.3f}"),
                                                ("nystrom_oracle", "{:.3f}"), ("nystrom_fraction", "{:.3f}"))]
            out.append(f"| {r['method']} | {r['s']} | " + " | ".join(cells) + " |")
    welch = d.get("welch_local_global_vs_eigen") or []
    if welch:
        tested = [w for w in welch if w["t"] == w["t"]]
        wins = {m: sum(w["better"] == m for w in welch) for m in ("local-global", "eigen", "tie")}
        how = ("Welch's t over the seeds where a side varies; – where neither does" if tested else
               "neither method varies over the seeds (std 0), so no test applies and each row compares exact values")
        out += ["", f"Algorithm 1 against `eigen`, per s and metric ({how}). Algorithm 1 is better in "
                f"{wins['local-global']} of {len(welch)} rows, eigen in {wins['eigen']}, tied in {wins['tie']}:", "",
                "| s | metric | Algorithm 1 | eigen | t | p | better |", "|---|---|---|---|---|---|---|"]
        for w in welch:
            t = "–" if w["t"] != w["t"] else f"{w['t']:.2f}"
            pv = "–" if w["p"] != w["p"] else f"{w['p']:.2g}"
            out.append(f"| {w['s']} | {w['metric']} | {w['local-global']:.4f} | {w['eigen']:.4f} | {t} | {pv} | "
                       f"{w['better']} |")
    return "\n".join(out)


def write_readme(d: dict) -> bool:
    return write_readme_block("gradients-tables", render(d))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--distilled", default=None, help="a stage-1 distilled set folder (default: random real m=500)")
    ap.add_argument("--full-grid", action="store_true", help="the reviewers' 6×5×4 (τ_v, τ_g, H) grid")
    ap.add_argument("--ridge", type=float, default=1e-4)
    ap.add_argument("--render", action="store_true", help="only write the README's tables from gradients.json")
    args = ap.parse_args()
    if args.render:
        import json
        print("README updated" if write_readme(json.loads((RESULTS / "gradients.json").read_text()))
              else "README has no <!-- gradients-tables --> markers")
        return
    torch.set_num_threads(2)
    t_all = time.perf_counter()
    model, tr, te = teacher_and_data()
    teacher_acc, _ = evaluate(model, te)
    if args.distilled:
        ds = dntk.distill.load_distilled(args.distilled)
        ds.check_compatible(tr)
        order = balanced_indices(ds.labels, len(ds), 10)
        X_train, labels_train = ds.tensors(order)
        source = f"distilled set {args.distilled} ({ds.method})"
    else:
        idx = balanced_indices(tr.labels, 500, 10, seed=0)
        X_train, labels_train = tr.tensors(idx)
        source = "random real subset, 50 per class"
    t = time.perf_counter()
    ftr = features(model, X_train, "distilled" if args.distilled else "random500")
    fte = features(model, te.tensors()[0], "val")
    t_features = time.perf_counter() - t
    t_stage = time.perf_counter()
    F, Ft, _ = shared_normalisation(ftr, fte)
    Y = ftr.logits.double()
    evaluation = dict(logits_test=fte.logits, labels_test=te.labels, ridge=args.ridge)
    m = len(F)
    full = fit_evaluate(F, Y, Ft, normalize=None, **evaluation)

    spec = spectral_summary(F, labels_train, tau_v=0.95)
    names = list(tr.classes)
    figure2(spec["spectra"], spec["ranks"], RESULTS / "gradients_figure2.png", class_names=names)
    lg = local_global_summary(spec["kernels"], names, n_clusters=10, tau_v=0.95, tau_g=0.9)
    class_figure4(lg[0], lg[0]["figure"], 0.9, RESULTS / "gradients_figure4_class0.png")
    lg = [{k: v for k, v in row.items() if k != "figure"} for row in lg]

    # a second network for held-out targets: the library's student (teacher's architecture, soft labels
    # relabelled per augmented batch, 15 epochs) trained on the m training images alone
    student = build_network(TEACHER, DATA.dataset, DATA.image_size, te)
    student, student_acc = train_student(student, model, DistilledSet(X_train, labels_train, list(te.classes), te.mean,
                                                                      te.std, te.name, "random"), te,
                                         ROOT / f"bench-student-heldout-{digest(X_train)}", dataset=DATA.dataset,
                                         epochs=15, seed=0, eval_every=15, progress=False)
    with torch.no_grad():
        student_targets = (student(X_train).double(), evaluate(student, te)[1].double())
    budgets = sorted({1} | {max(1, round(m / r)) for r in (20, 50, 100)})
    rows = budget_curves(F.features, Y, Ft.features, budgets=budgets, methods=GRADIENT_METHODS, seeds=(0, 1, 2),
                         unseen_labels=(labels_train, te.labels), other_targets={"student": student_targets},
                         unseen_seeds="all", **evaluation)
    welch = compare_methods(rows, "local-global", "eigen")
    figure3(rows, m, RESULTS / "gradients_figure3.png")
    rc = rank_curve(F, Y, Ft, **evaluation)
    figure5(rc, RESULTS / "gradients_figure5.png")
    grid_kw = {} if args.full_grid else {"tau_vs": (0.45, 0.65, 0.85, 0.95), "tau_gs": (0.7, 0.9, 0.99), "clusters": (5, 10, 20)}
    grid = grid_search(F.features, Y, Ft.features, **evaluation, **grid_kw)
    pareto_figure(grid["rows"], grid["pareto"], RESULTS / "gradients_pareto.png")
    t_stage = time.perf_counter() - t_stage

    print(f"\nteacher val accuracy {teacher_acc:.4f}; training gradients: {source}; m={m}, k=4096; "
          f"KRR on all m: fidelity {full['fidelity']:.4f}, accuracy {full['accuracy']:.4f}, mse {full['mse']:.4g}")
    cols = [("method", "method", ""), ("s", "s", "{}"), ("compression", "m/s", "{:.0f}×"),
            ("fidelity", "fidelity", "{:.4f}"), ("fidelity_std", "±", "{:.4f}"), ("accuracy", "accuracy", "{:.4f}"),
            ("accuracy_std", "±", "{:.4f}"), ("mse", "MSE", "{:.4g}"), ("mse_std", "±", "{:.3g}")]
    order = sorted(rows, key=lambda r: (-r["compression"], r["method"] != "local-global", r["method"]))
    print(table(order, cols))
    print("\nthe same sets on what they did not see (first seed): refit on one-hot labels / a GP-prior function "
          "(agreement = argmax agreement with the all-m model on those targets), kernel-level errors on the test points")
    print(table(order, [("method", "method", ""), ("s", "s", "{}"), ("jacobians", "Jacobians", "{:,}"),
                        ("fidelity", "fidelity (built for)", "{:.4f}"), ("onehot_accuracy", "labels: accuracy", "{:.4f}"),
                        ("onehot_agreement", "labels: agreement", "{:.4f}"),
                        ("student_agreement", "student logits: agreement", "{:.4f}"),
                        ("student_relative_mse", "student: rel. MSE", "{:.3g}"), ("gp_agreement", "GP: agreement", "{:.4f}"),
                        ("gp_relative_mse", "GP: rel. MSE", "{:.3g}"), ("nystrom_error", "Nyström err.", "{:.3f}"),
                        ("posterior_variance_error", "post. var. err.", "{:.3g}"),
                        ("principal_cos2", "cos² top-r", "{:.3f}")]))
    print("\nthe optimum lines: training-kernel error ‖ΦP_SΦᵀ − K‖/‖K‖ beside its Eckart–Young minimum (reached by "
          "eigen), and the test points' Nyström error beside its oracle minimum (top-s singular subspace of X P_Φ; "
          "the training eigenvectors are not guaranteed to reach it): fraction = share of the achievable reduction")
    print(table(order, [("method", "method", ""), ("s", "s", "{}"), ("train_kernel_error", "train kernel err.", "{:.4f}"),
                        ("eckart_young", "Eckart–Young", "{:.4f}"), ("nystrom_error", "Nyström err. (test)", "{:.4f}"),
                        ("nystrom_oracle", "oracle", "{:.4f}"), ("nystrom_fraction", "fraction", "{:.3f}")]))
    print("\nAlgorithm 1 (local-global) against eigen, Welch's t over the seeds (t > 0: Algorithm 1 higher; eigen is "
          "deterministic, so its spread is 0 and the test is one-sample against its value)")
    print(table(welch, [("s", "s", "{}"), ("metric", "metric", ""), ("local-global", "Algorithm 1", "{:.4f}"),
                        ("eigen", "eigen", "{:.4f}"), ("t", "t", "{:.2f}"), ("p", "p", "{:.3g}"),
                        ("better", "better", "")]))
    ranks_all = spec["ranks"][ALL_POINTS]
    ranks_own = spec["ranks"][OWN_CLASS]
    gaps = [r["uncovered_variance_fraction"] for r in lg]
    gap_sets = [r["gap_variance_fraction"] for r in lg]
    print(f"\ntruncation ranks at ε=0.05 — per-logit kernel over all {m} points: {ranks_all}; own-class blocks: {ranks_own} "
          f"(paper: {PAPER['truncation_ranks']})")
    print(f"coverage gap (H=10, τ_g=0.9): uncovered global variance {min(gaps):.1%}–{max(gaps):.1%}; variance in gap "
          f"directions {min(gap_sets):.1%}–{max(gap_sets):.1%} (paper: {PAPER['coverage_gap']})")
    at100 = {r["method"]: r for r in rows if round(r["compression"]) == 100}
    lg100 = at100.get("local-global")
    if lg100:
        print(f"at 100×: local-global accuracy {lg100['accuracy']:.4f} / fidelity {lg100['fidelity']:.4f} "
              f"(paper: {PAPER['accuracy_at_100x']} / {PAPER['fidelity_at_100x']}); best baseline accuracy "
              f"{max(r['accuracy'] for k_, r in at100.items() if k_ != 'local-global'):.4f}")
    print(f"grid: {len(grid['rows'])} configurations, Pareto frontier: "
          + ", ".join(f"s={r['s']:.1f}→{r['accuracy']:.3f}" for r in grid["pareto"]))
    print(f"stage time (spectra, Algorithm 1 and baselines at 3 budgets × 3 seeds, figures, grid): {t_stage:.1f} s; "
          f"feature extraction {t_features:.1f} s; total {time.perf_counter() - t_all:.1f} s")
    print(f"second network for held-out targets: a student trained on the {m} points, val accuracy {student_acc:.4f}")
    write_json("gradients.json", {"student_val_accuracy": student_acc,
        "machine": machine(), "source": source, "m": m, "k": 4096, "teacher_val_accuracy": teacher_acc,
        "kernel_model_all_m": full, "rows": rows, "ranks": spec["ranks"], "redundancy": spec["redundancy"],
        "local_global": lg, "rank_curve": rc, "grid": grid, "paper": PAPER, "welch_local_global_vs_eigen": welch,
        "seconds": {"stage": t_stage, "features": t_features}})


if __name__ == "__main__":
    main()
