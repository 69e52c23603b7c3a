"""Gradient distillation (stage 3): Algorithm 1 and the selection baselines."""

from .local_global import MODES, DistilledGradients, local_global, synthesize, truncation_ranks
from .selection import METHODS, ridge_leverage_scores, select

__all__ = ["local_global", "synthesize", "truncation_ranks", "DistilledGradients", "select", "ridge_leverage_scores",
           "METHODS", "MODES"]
