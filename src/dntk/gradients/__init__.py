"""Gradient distillation (stage 3): Algorithm 1, the selection baselines, and their evaluation."""

from .evaluation import GRADIENT_METHODS, budget_curves, distill_gradients, evaluate_distilled, grid_search, pareto_front
from .local_global import MODES, DistilledGradients, local_global, synthesize, truncation_ranks
from .selection import SELECTION_METHODS, ridge_leverage_scores, select

__all__ = ["local_global", "synthesize", "truncation_ranks", "DistilledGradients", "select", "ridge_leverage_scores",
           "SELECTION_METHODS", "GRADIENT_METHODS", "MODES", "distill_gradients", "evaluate_distilled",
           "budget_curves", "grid_search", "pareto_front"]
