"""Per-sample, per-logit gradient features and the exact empirical NTK."""

from .capture import GradientCapture, OpRule, parameter_table, register, unregister
from .check import ModelCheck, brute_force_jacobian, check_model, check_rule
from .extract import gradient_features
from .ntk import empirical_ntk
from .result import FeatureResult
from .sliced import sliced_class_kernels

__all__ = ["gradient_features", "FeatureResult", "empirical_ntk", "sliced_class_kernels", "GradientCapture", "parameter_table",
           "check_model", "check_rule", "ModelCheck", "brute_force_jacobian", "OpRule", "register", "unregister"]
