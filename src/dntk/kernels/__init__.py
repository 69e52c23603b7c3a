"""Kernel models on per-class NTK features: the per-class KRR, its one normalisation, its sweeps."""

from .evaluation import FIG5_RANKS, compare_with_exact, default_m_grid, fit_evaluate, krr_curve, rank_curve
from .krr import PerClassKRR, one_hot
from .normalisation import class_scale, shared_normalisation
from .streaming import class_weights, curve_from_predictions, gather_predictions, predict_shards, predict_with_weights

__all__ = ["PerClassKRR", "one_hot", "class_scale", "shared_normalisation", "fit_evaluate", "krr_curve",
           "rank_curve", "default_m_grid", "FIG5_RANKS", "class_weights", "predict_with_weights",
           "predict_shards", "gather_predictions", "curve_from_predictions", "compare_with_exact"]
