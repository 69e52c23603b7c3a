"""Stage 1 — data distillation: WMDD, real-image baselines, and the shared on-disk format."""

from .coresets import covering_radius, kcenter_greedy, select_real
from .kernel_select import CRITERIA, Selection, greedy_kernel_selection, pool_indices, select_kernel_aware
from .distilled import DistilledSet, check_ipc, load_distilled, save_distilled
from .methods import DISTILLERS, evaluate_distilled, kernel_options, TrainingPoints, distill_dataset, distilled_folder, training_points
from .wmdd import (WMDDConfig, barycenter, bn_layers, class_bn_statistics, class_features, wasserstein2, wmdd,
                   wmdd_objective)

__all__ = ["distill_dataset", "DISTILLERS", "training_points", "TrainingPoints", "distilled_folder", "wmdd", "WMDDConfig", "barycenter", "class_bn_statistics",
           "class_features", "wasserstein2", "wmdd_objective", "bn_layers", "select_real", "kcenter_greedy",
           "covering_radius", "DistilledSet", "load_distilled", "save_distilled", "check_ipc", "greedy_kernel_selection", "select_kernel_aware", "pool_indices", "Selection",
           "CRITERIA", "evaluate_distilled", "kernel_options"]
