"""Gradient distillation as a user runs it: one dispatcher over Algorithm 1 and the selection
baselines, the synthetic kernel model's metrics, budget curves (Figure 3) and the (τ_v, τ_g, H)
grid with its Pareto frontier. Computation only.

Every kernel model here uses features already divided by √ν_c of the full training kernel
(:func:`dntk.kernels.shared_normalisation`) and an absolute ridge, so the ridge means the same for
every method and every s.
"""

from __future__ import annotations

import time
import warnings

import torch

from .. import validate as V
from ..errors import DNTKError
from ..kernels import fit_evaluate, one_hot
from .kernel_metrics import (AllM, gp_prior_targets, heldout_target_metrics, nystrom_kernel_error, optimum_lines,
                             posterior_variance_error, principal_angles)
from .local_global import local_global
from .selection import SELECTION_METHODS, select
from .target import eigen, hybrid, hybrid_eigen, target_direction

TARGET_METHODS = ("target-direction", "hybrid")
SPECTRAL_METHODS = ("eigen", "hybrid-eigen")   # the top-s eigenvectors of each class kernel (Eckart–Young)
GRADIENT_METHODS = ("local-global",) + SELECTION_METHODS + TARGET_METHODS + SPECTRAL_METHODS
NEEDS_BUDGET = SELECTION_METHODS + ("hybrid",) + SPECTRAL_METHODS


def distill_gradients(method: str, F: torch.Tensor, Y: torch.Tensor, *, budget: int | None = None,
                      tau_v: float = 0.95, tau_g: float = 0.9, n_clusters: int = 10, mode: str = "per_class",
                      seed: int = 0, coverage_mode: str = "union", gap: str = "full", ridge: float = 1e-4):
    """Synthetic gradients per class kernel by ``method`` (one of ``GRADIENT_METHODS``).

    F [C, m, k] features, Y [m, C] targets → :class:`~dntk.gradient_distillation.DistilledGradients`.
    ``local-global`` is Algorithm 1 (budget mode when ``budget`` is given); the selection baselines
    need ``budget`` (s gradients per class), as do ``eigen`` (the top-s eigenvectors of each class kernel) and
    ``hybrid-eigen`` (the target direction + the top s − 1 on its complement); ``target-direction`` (default
    s = 1), ``hybrid`` (the target direction plus Algorithm 1's s − 1) and ``hybrid-eigen`` use ``ridge``, the absolute ridge of the model fitted on them, and
    ``leverage`` uses it for its scores. ``budget`` is None or an integer ≥ 1 (0, negative, float or bool
    budgets are refused, never replaced by a default); ``seed`` an integer ≥ 0; ``ridge`` ≥ 0."""
    if budget is not None:
        budget = V.count(budget, "budget", "pass the number of synthetic gradients per class kernel (an integer ≥ 1), "
                         "or None", where="distill_gradients")
    seed = V.seed(seed, where="distill_gradients")
    ridge = V.nonnegative(ridge, "ridge", "pass the absolute ridge λ ≥ 0 of the kernel model", where="distill_gradients")
    if method == "local-global":
        return local_global(F, Y, tau_v=tau_v, tau_g=tau_g, n_clusters=n_clusters, mode=mode, budget=budget,
                            coverage_mode=coverage_mode, gap=gap, seed=seed)
    if method == "target-direction":
        return target_direction(F, Y, 1 if budget is None else budget, ridge=ridge)
    if method == "hybrid":
        if budget is None:
            raise DNTKError("--gradient-distill hybrid needs --budget s (the target direction + s − 1 of Algorithm 1)")
        return hybrid(F, Y, budget, ridge=ridge, seed=seed, tau_v=tau_v, tau_g=tau_g, n_clusters=n_clusters,
                      mode=mode, coverage_mode=coverage_mode, gap=gap)
    if method in SPECTRAL_METHODS:
        if budget is None:
            raise DNTKError(f"--gradient-distill {method} needs --budget s (eigenvectors per class kernel)")
        return eigen(F, Y, budget) if method == "eigen" else hybrid_eigen(F, Y, budget, ridge=ridge)
    if method in SELECTION_METHODS:
        if budget is None:
            raise DNTKError(f"--gradient-distill {method} needs --budget s (gradients per class kernel)")
        return select(F, Y, budget, method, seed=seed, ridge=ridge)
    raise DNTKError(f"unknown gradient distillation {method!r}; valid names: none, {', '.join(GRADIENT_METHODS)}")


def evaluate_gradient_set(dg, F_test, logits_test, labels_test, *, ridge: float, targets_test=None) -> dict:
    """Metrics of the kernel model on the synthetic set ``dg`` (absolute ridge, no renormalisation)."""
    return fit_evaluate(dg.features, dg.targets, F_test, logits_test, labels_test, ridge=ridge, normalize=None,
                        targets_test=targets_test)


def unseen_measures(dg, F, F_test, labels_train, labels_test, *, ridge: float, seed: int = 0,
                    other_targets: dict | None = None, reference: AllM | None = None) -> dict:
    """What a synthetic set did not see, flattened for tables: its refit on one-hot labels (test
    accuracy, argmax agreement with the all-m model), on a GP-prior function and on every
    ``other_targets`` {name: (y_train [m, C], y_test [n, C])} — e.g. a second network's logits —
    (agreement, relative MSE against the all-m model on those targets), and the kernel-level errors
    (:mod:`dntk.gradient_distillation.kernel_metrics`). ``reference``: an :class:`AllM` of (F, F_test, ridge), so
    a sweep computes the all-m side once."""
    ref = reference if reference is not None else AllM(F, F_test, ridge)
    C = F.shape[0]
    targets = {"onehot": (one_hot(labels_train, C), one_hot(labels_test, C)),
               "gp": gp_prior_targets(F, F_test, seed=seed), **(other_targets or {})}
    held = {name: heldout_target_metrics(dg, F, F_test, y_tr, y_te, ridge=ridge,
                                         labels_test=None if name == "gp" else labels_test, reference=ref)
            for name, (y_tr, y_te) in targets.items()}
    angles = principal_angles(F, dg, r=10, reference=ref)
    out = {f"{name}_{key}": held[name][key] for name in held for key in ("agreement", "relative_mse")}
    out.update({"onehot_accuracy": held["onehot"]["synthetic"]["accuracy"],
                "nystrom_error": nystrom_kernel_error(F, dg, F_test, reference=ref),
                "posterior_variance_error": posterior_variance_error(F, dg, F_test, ridge=ridge, reference=ref),
                "principal_cos2": angles["mean_cos2"], "principal_r": angles["r"],
                **optimum_lines(F, dg, F_test, reference=ref)})
    return out


def budget_curves(F, Y, F_test, logits_test, labels_test, *, ridge, budgets, methods, seeds=(0, 1, 2), n_clusters=10,
                  tau_v=0.95, tau_g=0.9, mode="per_class", targets_test=None, unseen_labels=None,
                  other_targets=None, unseen_seeds: str = "first") -> list[dict]:
    """Metrics (mean ± std over seeds) for every method and budget s ≤ m. F [C, m, k], F_test [C, n, k].

    With ``unseen_labels=(labels_train [m], labels_test [n])`` each row also holds
    :func:`unseen_measures` of the first seed's set — or, ``unseen_seeds="all"``, their mean over the
    seeds with ``<key>_std`` and the per-seed ``<key>_values`` (for tests between methods). ``jacobians``:
    the per-sample per-logit Jacobians a method needs to build its set — all m·C for every method here
    (each reads all m gradients)."""
    if unseen_seeds not in ("first", "all"):
        raise DNTKError(f"unseen_seeds must be 'first' or 'all', got {unseen_seeds!r}")
    rows, reference = [], None
    m = F.shape[1]
    for method in methods:
        for s in budgets:
            if s > m:
                continue
            runs, unseen = [], []
            if unseen_labels is not None and reference is None:
                reference = AllM(F, F_test, ridge)
            t = time.perf_counter()
            for seed in seeds:
                dg = distill_gradients(method, F, Y, budget=s, tau_v=tau_v, tau_g=tau_g, n_clusters=n_clusters,
                                       mode=mode, seed=seed, ridge=ridge)
                runs.append(evaluate_gradient_set(dg, F_test, logits_test, labels_test, ridge=ridge,
                                               targets_test=targets_test))
                if unseen_labels is not None and (unseen_seeds == "all" or not unseen):
                    unseen.append(unseen_measures(dg, F, F_test, *unseen_labels, ridge=ridge, seed=seeds[0],
                                                  other_targets=other_targets, reference=reference))
            row = {"method": method, "s": s, "compression": m / s, "seeds": len(seeds),
                   "jacobians": m * F.shape[0], "seconds": (time.perf_counter() - t) / len(seeds)}
            if len(unseen) == 1:
                row.update(unseen[0])
            elif unseen:
                for key in unseen[0]:
                    vals = [u[key] for u in unseen]
                    row[key] = sum(vals) / len(vals)
                    row[f"{key}_std"] = float(torch.tensor(vals, dtype=torch.float64).std(unbiased=False))
                    row[f"{key}_values"] = vals
            for key in runs[0]:  # the distillation targets' metrics, mean ± std over seeds
                vals = torch.tensor([r[key] for r in runs], dtype=torch.float64)
                row[key] = float(vals.mean())
                row[f"{key}_std"] = float(vals.std(unbiased=False))
                row[f"{key}_values"] = vals.tolist()
            rows.append(row)
    return rows


def pareto_front(rows: list[dict], x: str = "s", y: str = "accuracy") -> list[dict]:
    """Rows not dominated by another with smaller-or-equal x and larger-or-equal y."""
    front, best = [], float("-inf")
    for r in sorted(rows, key=lambda r: (r[x], -r[y])):
        if r[y] > best:
            front.append(r)
            best = r[y]
    return front


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
                res = evaluate_gradient_set(dg, F_test, logits_test, labels_test, ridge=ridge, targets_test=targets_test)
                rows.append({"tau_v": tv, "tau_g": tg, "n_clusters": H, "s": sum(dg.sizes) / len(dg.sizes), **res})
    return {"rows": rows, "pareto": pareto_front(rows, "s", "accuracy")}


# metric → whether higher is better: what :func:`compare_methods` tests
COMPARED_METRICS = {"fidelity": True, "accuracy": True, "mse": False, "onehot_accuracy": True, "onehot_agreement": True,
                    "student_agreement": True, "gp_agreement": True, "nystrom_error": False,
                    "posterior_variance_error": False, "principal_cos2": True, "train_kernel_error": False}


def compare_methods(rows: list[dict], a: str, b: str) -> list[dict]:
    """Method a against method b in :func:`budget_curves` rows, per budget s and metric of
    :data:`COMPARED_METRICS` that both rows hold per seed (``<metric>_values``): both means, Welch's t
    and its two-sided p (scipy, unequal variances; NaN when neither side varies over its seeds — a
    deterministic method against another: the values are then compared exactly) and ``better``
    (a, b or "tie", by the metric's direction; means within 1e-12 relative are a tie)."""
    from scipy.stats import ttest_ind

    out = []
    by = {(r["method"], r["s"]): r for r in rows}
    for s in sorted({r["s"] for r in rows}):
        ra, rb = by.get((a, s)), by.get((b, s))
        if ra is None or rb is None:
            continue
        for key, higher in COMPARED_METRICS.items():
            va, vb = ra.get(f"{key}_values"), rb.get(f"{key}_values")
            if va is None or vb is None:
                continue
            ma, mb = sum(va) / len(va), sum(vb) / len(vb)
            scale = 1e-12 * max(1.0, max(abs(v) for v in va + vb))
            if max(va) - min(va) <= scale and max(vb) - min(vb) <= scale:
                t, p = float("nan"), float("nan")
            else:   # one side constant (a deterministic method): scipy warns of its zero variance, rightly computed
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
                    t, p = ttest_ind(va, vb, equal_var=False)
            diff = 0.0 if abs(ma - mb) <= scale else ma - mb
            better = "tie" if diff == 0 else (a if (diff > 0) == higher else b)
            out.append({"s": s, "metric": key, a: ma, b: mb, "t": float(t), "p": float(p), "better": better})
    return out
