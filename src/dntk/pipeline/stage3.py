"""Stage 3 of ``dntk run``, orchestrated: shared normalisation → spectra → gradient distillation →
its kernel model beside the all-m model → held-out targets (one-hot labels, a GP-prior function) and
kernel-level metrics (:mod:`dntk.gradient_distillation.kernel_metrics`) → budget curves (Figure 3) → local–global structure
(Figure 4) → rank curve (Figure 5). Every number is computed by :mod:`dntk.kernels`,
:mod:`dntk.spectral` and :mod:`dntk.gradient_distillation`; the figures are drawn afterwards in one call to
:func:`dntk.report.gradient_stage_figures`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ..gradient_distillation import (GRADIENT_METHODS, budget_curves, distill_gradients, evaluate_gradient_set, gp_prior_targets,
                         heldout_target_metrics, nystrom_kernel_error, posterior_variance_error, principal_angles)
from ..kernels import fit_evaluate, one_hot, rank_curve, shared_normalisation
from ..spectral import local_global_summary, spectral_summary


FIG3_COMPRESSIONS = (20, 50, 100)   # m/s points Figure 3 always evaluates (the paper's 20×/50×/100×)


def figure3_budgets(m: int) -> tuple[int, ...]:
    """Figure 3's budgets s for m points: 5, 10, 25 and s = m/20, m/50, m/100 (rounded, ≥ 1)."""
    return tuple(sorted({5, 10, 25} | {max(1, round(m / r)) for r in FIG3_COMPRESSIONS}))


@dataclass
class GradientStage:
    """summary: what results.json holds under ``gradient_distillation``; spectra and
    local_global_arrays: the arrays Figures 2 and 4 plot."""

    summary: dict
    spectra: dict
    local_global_arrays: list


def gradient_stage(train, Y, labels_train, test, logits_test, labels_test, *, cfg, ridge: float, seed: int,
                   class_names=None, targets_test=None, fig3_budgets=(5, 10, 25), fig3_seeds=None) -> GradientStage:
    """train / test: FeatureResults [C, m, k] / [C, n, k]; Y [m, C] regression targets; labels_train [m];
    cfg: a :class:`dntk.config.GradientConfig`. ``targets_test``: the test inputs' targets of the kind
    Y holds (every ``mse`` is against them; ``mse_vs_teacher_logits`` against logits_test). fig3_seeds: Figure 3's
    seeds (None: 0..cfg.curve_seeds − 1)."""
    F, Ft, _ = shared_normalisation(train, test)
    m = len(F)
    n_clusters = min(cfg.clusters, m)
    timings = {}
    evaluation = dict(logits_test=logits_test, labels_test=labels_test, ridge=ridge, targets_test=targets_test)

    t = time.perf_counter()
    spec = spectral_summary(F, labels_train, tau_v=cfg.tau_v)
    timings["spectra"] = time.perf_counter() - t
    t = time.perf_counter()
    dg = distill_gradients(cfg.method, F.features, Y, budget=cfg.budget, tau_v=cfg.tau_v, tau_g=cfg.tau_g,
                           n_clusters=n_clusters, mode=cfg.mode, seed=seed, ridge=ridge)
    timings["distill"] = time.perf_counter() - t
    res = evaluate_gradient_set(dg, Ft.features, **evaluation)
    full = fit_evaluate(F, Y, Ft, normalize=None, **evaluation)
    t = time.perf_counter()
    C = Y.shape[1]
    heldout = {"onehot_labels": heldout_target_metrics(dg, F, Ft, one_hot(labels_train, C), one_hot(labels_test, C),
                                                       ridge=ridge, labels_test=labels_test),
               "gp_prior": heldout_target_metrics(dg, F, Ft, *gp_prior_targets(F, Ft, seed=seed), ridge=ridge)}
    kernel_level = {"nystrom_kernel_error": nystrom_kernel_error(F, dg, Ft),
                    "posterior_variance_error": posterior_variance_error(F, dg, Ft, ridge=ridge),
                    "principal_angles": principal_angles(F, dg, r=10)}
    timings["heldout_and_kernel_metrics"] = time.perf_counter() - t
    t = time.perf_counter()
    budgets = sorted({b for b in fig3_budgets if b <= m} | ({cfg.budget} if cfg.budget else set()))
    seeds = tuple(fig3_seeds) if fig3_seeds is not None else tuple(range(cfg.curve_seeds))
    # every row also carries what its set did not see (one-hot labels, a GP-prior function) and the kernel-level
    # measures with their optimum lines, per seed (``_values``) so methods can be tested against each other
    curves = budget_curves(F.features, Y, Ft.features, budgets=budgets, methods=GRADIENT_METHODS, seeds=seeds,
                           n_clusters=n_clusters, tau_v=cfg.tau_v, tau_g=cfg.tau_g, mode=cfg.mode,
                           unseen_labels=(labels_train, labels_test), unseen_seeds="all", **evaluation)
    timings["budget_curves"] = time.perf_counter() - t
    t = time.perf_counter()
    lg = local_global_summary(spec["kernels"], class_names, n_clusters=n_clusters, tau_v=cfg.tau_v, tau_g=cfg.tau_g,
                              seed=seed)
    timings["local_global"] = time.perf_counter() - t
    t = time.perf_counter()
    rc = rank_curve(F, Y, Ft, **evaluation)
    timings["rank_curve"] = time.perf_counter() - t
    s = dg.sizes
    summary = {
        "method": cfg.method, "mode": cfg.mode, "budget": cfg.budget, "tau_v": cfg.tau_v, "tau_g": cfg.tau_g,
        "n_clusters": n_clusters, "s": s, "s_mean": sum(s) / len(s), "m": m, "compression": m / (sum(s) / len(s)),
        "ranks": spec["ranks"], "redundancy": spec["redundancy"],
        "kernel_model": res, "kernel_model_all_m": full, "ridge_absolute": ridge,
        "heldout_targets": heldout, "kernel_metrics": kernel_level,
        "local_global": [{k: v for k, v in row.items() if k != "figure"} for row in lg],
        "figure3_rows": curves, "figure5_rows": rc, "timings_s": timings,
        "record": {k: v for k, v in dg.record.items() if k != "per_class"},
    }
    return GradientStage(summary, spec["spectra"], [row["figure"] for row in lg])
