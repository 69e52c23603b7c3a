"""dntk — the distilled neural tangent kernel of trained PyTorch classifiers.

The public surface::

    dntk.empirical_ntk(model, x1, x2=None, blocks="per_class")   # exact eNTK, float64
    dntk.gradient_features(model, inputs, projector)              # projected per-logit features [C, n, k]
    dntk.projection.make(name, k=..., seed=...)                   # identity / gaussian / rademacher / sjlt / tensorsketch
    dntk.kernels.PerClassKRR(ridge=1e-4, normalize="trace")       # per-class kernel model
    dntk.metrics                                                  # fidelity, accuracy, MSE, conditioning, kernel errors

Shape conventions: features are [C, n, k] (logit, sample, feature); kernels are [C, n1, n2];
targets and logits are [n, C].
"""

from . import projection
from .errors import DNTKError
from .features import FeatureResult, empirical_ntk, gradient_features

__version__ = "0.1.0"

__all__ = ["empirical_ntk", "gradient_features", "FeatureResult", "projection", "DNTKError", "__version__"]
