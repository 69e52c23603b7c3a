"""Per-sample, per-logit gradient features and the exact empirical NTK."""

from .capture import GradientCapture, parameter_table
from .check import ModelCheck, brute_force_jacobian, check_model
from .engine import gradient_features
from .ntk import empirical_ntk, sliced_class_kernels
from .result import FeatureResult

__all__ = ["gradient_features", "FeatureResult", "empirical_ntk", "sliced_class_kernels", "GradientCapture", "parameter_table",
           "check_model", "ModelCheck", "brute_force_jacobian"]
