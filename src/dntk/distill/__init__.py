"""Stage 1 — data distillation: WMDD, real-image baselines, the kernel-aware selection and the shared
on-disk format. (The glue from a run's settings to the kernel model's training points is
:mod:`dntk.pipeline.stage1`.)"""

from .coresets import covering_radius, kcenter_greedy, select_real
from .kernel_select import CRITERIA, Selection, greedy_kernel_selection, pool_indices, select_kernel_aware
from .distilled import DistilledSet, check_ipc, load_distilled, save_distilled
from .methods import DISTILLERS, distill_dataset
from .wmdd import (WMDDConfig, barycenter, bn_layers, class_bn_statistics, class_features, wasserstein2, wmdd,
                   wmdd_objective)

__all__ = ["distill_dataset", "DISTILLERS", "wmdd", "WMDDConfig", "barycenter", "class_bn_statistics",
           "class_features", "wasserstein2", "wmdd_objective", "bn_layers", "select_real", "kcenter_greedy",
           "covering_radius", "DistilledSet", "load_distilled", "save_distilled", "check_ipc", "greedy_kernel_selection",
           "select_kernel_aware", "pool_indices", "Selection", "CRITERIA"]

from ..deprecation import moved

# the stage-1 glue moved to the application layer (dntk.pipeline.stage1); evaluate_distilled, which trains
# a student on the set, is now student_evaluation there (stage 3 has dntk.gradient_distillation.evaluate_gradient_set)
__getattr__ = moved(__name__, {"training_points": "dntk.pipeline.stage1:training_points",
                               "TrainingPoints": "dntk.pipeline.stage1:TrainingPoints",
                               "distilled_folder": "dntk.pipeline.stage1:distilled_folder",
                               "kernel_options": "dntk.pipeline.stage1:kernel_options",
                               "evaluate_distilled": "dntk.pipeline.stage1:student_evaluation"}, remove_in="0.2")
