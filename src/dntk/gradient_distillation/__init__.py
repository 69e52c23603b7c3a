"""Gradient distillation (stage 3): Algorithm 1, the selection baselines, the target-direction and spectral
methods, and their evaluation. (Was ``dntk.gradients``; that name is a deprecated alias until 0.2.)"""

from .evaluation import (COMPARED_METRICS, GRADIENT_METHODS, SPECTRAL_METHODS, TARGET_METHODS, budget_curves,
                         compare_methods, distill_gradients, evaluate_gradient_set,
                         grid_search, pareto_front, unseen_measures)
from .kernel_metrics import (gp_prior_targets, heldout_target_metrics, nystrom_kernel_error, optimum_lines,
                             posterior_variance,
                             posterior_variance_error, principal_angles)
from .local_global import MODES, DistilledGradients, local_global, synthesize, truncation_ranks
from .selection import SELECTION_METHODS, ridge_leverage_scores, select
from .target import eigen, hybrid, hybrid_eigen, target_direction

__all__ = ["local_global", "synthesize", "truncation_ranks", "DistilledGradients", "select", "ridge_leverage_scores",
           "SELECTION_METHODS", "GRADIENT_METHODS", "MODES", "distill_gradients", "evaluate_gradient_set",
           "budget_curves", "grid_search", "pareto_front", "TARGET_METHODS", "target_direction", "hybrid",
           "SPECTRAL_METHODS", "eigen", "hybrid_eigen",
           "nystrom_kernel_error", "optimum_lines", "posterior_variance", "posterior_variance_error", "principal_angles",
           "gp_prior_targets", "heldout_target_metrics", "unseen_measures", "compare_methods", "COMPARED_METRICS"]

from ..deprecation import moved

# stage 3's evaluate_distilled (a distilled gradient set's kernel model on test features) is evaluate_gradient_set
__getattr__ = moved(__name__, {"evaluate_distilled": "dntk.gradient_distillation.evaluation:evaluate_gradient_set"},
                    remove_in="0.2")
