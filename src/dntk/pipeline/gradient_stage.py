"""Stage 3 of ``dntk run``: spectra, gradient distillation (Algorithm 1 or a selection baseline),
the synthetic kernel model's metrics, and Figures 2–5.

All kernel models here share one normalisation: each class's features (train and test) are divided
by √ν_c, ν_c = mean diagonal of the *full* training kernel, and fitted with an absolute ridge. The
ridge then means the same thing for every method and every s (trace-normalising each synthetic
kernel by its own diagonal would not).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import metrics
from ..errors import DNTKError
from ..gradients import METHODS, local_global, select
from ..kernels import PerClassKRR
from ..report.spectral_figures import figure2, figure3, figure4, figure5, pareto_front
from ..spectral import (containment_curves, coverage_gap, data_redundancy, eigh_desc, local_global_structure,
                        own_class_blocks, truncation_rank, variance_heatmap)

GRADIENT_METHODS = ("local-global",) + METHODS
FIG3_BUDGETS = (5, 6, 8, 10, 13, 17, 22, 28, 35, 40)
FIG5_RANKS = (1, 2, 3, 5, 8, 13, 20, 30, 50, 80, 130, 200, 300, 500, 1000)


def normalise(F_train: torch.Tensor, F_test: torch.Tensor):
    """Divide each class's features by √(mean diagonal of its training kernel). Returns (train, test, ν)."""
    F_train, F_test = F_train.double(), F_test.double()
    nu = (F_train ** 2).sum(2).mean(1)                     # [C]
    if not bool((nu > 0).all()):
        raise DNTKError("a class's training gradients are all zero; check that every logit depends on trainable weights")
    s = nu.sqrt()[:, None, None]
    return F_train / s, F_test / s, nu


def distill(method: str, F, Y, *, budget=None, tau_v=0.95, tau_g=0.9, n_clusters=10, mode="per_class", seed=0,
            coverage_mode="union", gap="full"):
    if method == "local-global":
        return local_global(F, Y, tau_v=tau_v, tau_g=tau_g, n_clusters=n_clusters, mode=mode, budget=budget,
                            coverage_mode=coverage_mode, gap=gap, seed=seed)
    if method in METHODS:
        if budget is None:
            raise DNTKError(f"--gradient-distill {method} needs --budget s (gradients per class kernel)")
        return select(F, Y, budget, method, seed=seed)
    raise DNTKError(f"unknown gradient distillation {method!r}; valid names: none, {', '.join(GRADIENT_METHODS)}")


def fit_evaluate(features, targets, F_test, logits_test, labels_test, ridge, targets_test=None) -> dict:
    """Metrics of PerClassKRR(ridge, normalize=None) fitted on (features, targets). ``targets_test``:
    the test inputs' targets of the same kind as ``targets`` (``mse`` is against them; None = logits)."""
    pred = PerClassKRR(ridge=ridge, normalize=None).fit(features, targets).predict(F_test)
    return metrics.summarize(pred, logits_test, labels_test, targets_test)


def evaluate_distilled(dg, F_test, logits_test, labels_test, ridge, targets_test=None) -> dict:
    return fit_evaluate(dg.features, dg.targets, F_test, logits_test, labels_test, ridge, targets_test)


def budget_curves(F, Y, F_test, logits_test, labels_test, *, ridge, budgets, methods, seeds=(0, 1, 2), n_clusters=10,
                  tau_v=0.95, tau_g=0.9, mode="per_class", targets_test=None) -> list[dict]:
    """Metrics (mean ± std over seeds) for every method and budget s."""
    rows = []
    m = F.shape[1]
    for method in methods:
        for s in budgets:
            if s > m:
                continue
            runs = []
            t = time.perf_counter()
            for seed in seeds:
                dg = distill(method, F, Y, budget=s, tau_v=tau_v, tau_g=tau_g, n_clusters=n_clusters, mode=mode,
                             seed=seed)
                runs.append(evaluate_distilled(dg, F_test, logits_test, labels_test, ridge, targets_test))
            row = {"method": method, "s": s, "compression": m / s, "seeds": len(seeds),
                   "seconds": (time.perf_counter() - t) / len(seeds)}
            for key in runs[0]:
                vals = torch.tensor([r[key] for r in runs], dtype=torch.float64)
                row[key] = float(vals.mean())
                row[f"{key}_std"] = float(vals.std(unbiased=False))
            rows.append(row)
    return rows


def grid_search(F, Y, F_test, logits_test, labels_test, *, ridge, tau_vs=(0.45, 0.55, 0.65, 0.75, 0.85, 0.95),
                tau_gs=(0.7, 0.8, 0.9, 0.95, 0.99), clusters=(5, 10, 15, 20), mode="per_class", seed=0,
                targets_test=None) -> dict:
    """Algorithm 1 over the (τ_v, τ_g, H) grid; returns {"rows", "pareto"} over (mean s, accuracy)."""
    rows = []
    for H in clusters:
        for tv in tau_vs:
            for tg in tau_gs:
                dg = local_global(F, Y, tau_v=tv, tau_g=tg, n_clusters=H, mode=mode, seed=seed)
                if min(dg.sizes) == 0:
                    continue
                res = evaluate_distilled(dg, F_test, logits_test, labels_test, ridge, targets_test)
                rows.append({"tau_v": tv, "tau_g": tg, "n_clusters": H, "s": sum(dg.sizes) / len(dg.sizes), **res})
    return {"rows": rows, "pareto": pareto_front(rows, "s", "accuracy")}


def spectral_summary(F, labels_train, *, tau_v=0.95, eps=0.05):
    """Per-class spectra of the per-logit kernel over all m points and of the own-class blocks."""
    K = torch.einsum("cik,cjk->cij", F, F)
    lam_all, _ = eigh_desc(K)
    blocks = own_class_blocks(K, labels_train)
    lam_own = [eigh_desc(b)[0] for b in blocks]
    return {
        "kernels": K,
        "spectra": {"per-logit kernel, all m points": [l.tolist() for l in lam_all],
                    "own-class blocks": [l.tolist() for l in lam_own]},
        "ranks": {"per-logit kernel, all m points": truncation_rank(lam_all, tau_v),
                  "own-class blocks": [truncation_rank(l, tau_v) for l in lam_own]},
        "redundancy": {"per-logit kernel, all m points": data_redundancy(lam_all, eps),
                       "own-class blocks": [data_redundancy(l, eps) for l in lam_own]},
    }


def local_global_figures(K, class_names, out: Path, *, n_clusters=10, tau_v=0.95, tau_g=0.9, seed=0) -> list[dict]:
    """Figure 4 for every class; returns the per-class Property A/B summary."""
    summary = []
    for c in range(K.shape[0]):
        st = local_global_structure(K[c], n_clusters, tau_v, seed=seed)
        gap = coverage_gap(st, tau_g)
        curves = containment_curves(st, r_max=min(K.shape[1], 3 * st.r_g))
        name = class_names[c] if class_names else str(c)
        figure4(curves, variance_heatmap(st), gap["max_alignment"], gap["mean_alignment"], gap["coverage"], st.r_g,
                tau_g, out / f"figure4-class{c}.png",
                title=f"class {name}: r_g={st.r_g}, {st.n_clusters} clusters, "
                      f"uncovered {gap['uncovered_variance_fraction']:.1%} of global variance")
        at_rg = curves[:, st.r_g - 1]
        summary.append({"class": name, "r_g": st.r_g, "cluster_sizes": [int(l["indices"].numel()) for l in st.local],
                        "containment_at_r_g": {"max": float(at_rg.max()), "mean": float(at_rg.mean()),
                                               "min": float(at_rg.min())},
                        "gap_variance_fraction": gap["gap_variance_fraction"],
                        "uncovered_variance_fraction": gap["uncovered_variance_fraction"],
                        "n_gap_directions": len(gap["gap_directions"])})
    return summary


def rank_curve(F, Y, F_test, logits_test, labels_test, ridge, ranks=FIG5_RANKS, targets_test=None) -> list[dict]:
    m = F.shape[1]
    rs = [r for r in ranks if r <= min(m, F.shape[2])]
    model = PerClassKRR(ridge=ridge, normalize=None, form="dual").fit(F, Y)
    preds = model.sweep(F_test, ridges=(ridge,), ranks=rs)
    return [{"rank": r, **metrics.summarize(preds[(ridge, r)], logits_test, labels_test, targets_test)} for r in rs]


def run_gradient_stage(F_train, Y, labels_train, F_test, logits_test, labels_test, *, method, budget, tau_v, tau_g,
                       n_clusters, ridge, seed, out: Path, class_names=None, mode="per_class",
                       fig3_budgets=(5, 10, 25), fig3_seeds=(0,), targets_test=None) -> dict:
    """Everything stage 3 adds to results.json, with Figures 2–5 written to ``out``.

    ``targets_test``: the test inputs' regression targets of the kind Y holds (one-hot labels when Y
    is one-hot); every ``mse`` is against them, ``mse_vs_teacher_logits`` against logits_test."""
    F, Ft, nu = normalise(F_train, F_test)
    m = F.shape[1]
    timings = {}
    t = time.perf_counter()
    spec = spectral_summary(F, labels_train, tau_v=tau_v)
    figure2(spec["spectra"], spec["ranks"], out / "figure2.png", class_names=class_names, tau_v=tau_v)
    timings["spectra"] = time.perf_counter() - t
    t = time.perf_counter()
    dg = distill(method, F, Y, budget=budget, tau_v=tau_v, tau_g=tau_g, n_clusters=n_clusters, mode=mode, seed=seed)
    timings["distill"] = time.perf_counter() - t
    res = evaluate_distilled(dg, Ft, logits_test, labels_test, ridge, targets_test)
    full = fit_evaluate(F, Y, Ft, logits_test, labels_test, ridge, targets_test)
    t = time.perf_counter()
    methods = ("local-global",) + METHODS
    budgets = sorted({b for b in fig3_budgets if b <= m} | ({budget} if budget else set()))
    curves = budget_curves(F, Y, Ft, logits_test, labels_test, ridge=ridge, budgets=budgets, methods=methods,
                           seeds=fig3_seeds, n_clusters=n_clusters, tau_v=tau_v, tau_g=tau_g, mode=mode,
                           targets_test=targets_test)
    figure3(curves, m, out / "figure3.png")
    timings["figure3"] = time.perf_counter() - t
    t = time.perf_counter()
    lg = local_global_figures(spec["kernels"], class_names, out, n_clusters=n_clusters, tau_v=tau_v, tau_g=tau_g, seed=seed)
    timings["figure4"] = time.perf_counter() - t
    t = time.perf_counter()
    rc = rank_curve(F, Y, Ft, logits_test, labels_test, ridge, targets_test=targets_test)
    figure5(rc, out / "figure5.png")
    timings["figure5"] = time.perf_counter() - t
    s = dg.sizes
    return {
        "method": method, "mode": mode, "budget": budget, "tau_v": tau_v, "tau_g": tau_g, "n_clusters": n_clusters,
        "s": s, "s_mean": sum(s) / len(s), "m": m, "compression": m / (sum(s) / len(s)),
        "ranks": spec["ranks"], "redundancy": spec["redundancy"],
        "kernel_model": res, "kernel_model_all_m": full, "ridge_absolute": ridge,
        "local_global": lg, "figure3_rows": curves, "figure5_rows": rc, "timings_s": timings,
        "record": {k: v for k, v in dg.record.items() if k != "per_class"},
    }
