"""Stage-3 spectral summaries of the per-class kernels: spectra and truncation ranks (Figure 2) and
the local–global structure of every class (Figure 4, Properties A and B). Computation only; the
figures are drawn by :mod:`dntk.report` from what these functions return."""

from __future__ import annotations

import torch

from .analysis import (containment_curves, coverage_gap, data_redundancy, eigh_desc, local_global_structure,
                       own_class_blocks, truncation_rank, variance_heatmap)

ALL_POINTS, OWN_CLASS = "all_points", "own_class"   # the keys of "spectra" / "ranks"
SPECTRUM_LABELS = {ALL_POINTS: "per-logit kernel, all m points", OWN_CLASS: "own-class blocks"}   # their titles


def spectral_summary(features, labels: torch.Tensor, *, tau_v: float = 0.95, eps: float = 0.05) -> dict:
    """Per-class spectra of the per-logit kernel over all m points and of the own-class blocks.

    features: a :class:`~dntk.features.FeatureResult` with features [C, m, k]; labels [m].
    Returns {"kernels": [C, m, m] float64, "spectra", "ranks" (at τ_v), "redundancy" (Definition 3.1
    at ε)}, each keyed by ``ALL_POINTS`` and ``OWN_CLASS``."""
    K = features.kernel()
    lam_all, _ = eigh_desc(K)
    lam_own = [eigh_desc(b)[0] for b in own_class_blocks(K, labels)]
    return {
        "kernels": K,
        "spectra": {ALL_POINTS: [l.tolist() for l in lam_all], OWN_CLASS: [l.tolist() for l in lam_own]},
        "ranks": {ALL_POINTS: truncation_rank(lam_all, tau_v), OWN_CLASS: [truncation_rank(l, tau_v) for l in lam_own]},
        "redundancy": {ALL_POINTS: data_redundancy(lam_all, eps),
                       OWN_CLASS: [data_redundancy(l, eps) for l in lam_own]},
    }


def local_global_summary(K: torch.Tensor, class_names=None, *, n_clusters: int = 10, tau_v: float = 0.95,
                         tau_g: float = 0.9, seed: int = 0) -> list[dict]:
    """Property A/B of every class kernel K [C, m, m]: per class a dict with the JSON summary
    (``class``, ``r_g``, ``cluster_sizes``, ``containment_at_r_g``, ``gap_variance_fraction``,
    ``uncovered_variance_fraction``, ``n_gap_directions``) and, under ``"figure"``, the arrays
    Figure 4 plots (containment curves [H, r_max], variance heat-map [H, r_g], per-direction
    alignments and coverage)."""
    summary = []
    for c in range(K.shape[0]):
        st = local_global_structure(K[c], n_clusters, tau_v, seed=seed)
        gap = coverage_gap(st, tau_g)
        curves = containment_curves(st, r_max=min(K.shape[1], 3 * st.r_g))
        at_rg = curves[:, st.r_g - 1]
        summary.append({
            "class": class_names[c] if class_names else str(c), "r_g": st.r_g,
            "cluster_sizes": [int(l["indices"].numel()) for l in st.local],
            "containment_at_r_g": {"max": float(at_rg.max()), "mean": float(at_rg.mean()), "min": float(at_rg.min())},
            "gap_variance_fraction": gap["gap_variance_fraction"],
            "uncovered_variance_fraction": gap["uncovered_variance_fraction"],
            "n_gap_directions": len(gap["gap_directions"]),
            "figure": {"containment": curves, "heatmap": variance_heatmap(st), "max_alignment": gap["max_alignment"],
                       "mean_alignment": gap["mean_alignment"], "coverage": gap["coverage"],
                       "n_clusters": st.n_clusters}})
    return summary
