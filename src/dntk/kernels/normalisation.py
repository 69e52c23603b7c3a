"""The per-class trace scale ν_c — the one normalisation every kernel model, metric and stage-3
method uses.

ν_c = (1/m) tr K_c = (1/m) Σ_i ‖φ_c(x_i)‖², the mean diagonal of class c's training kernel. Dividing
K_c by ν_c (features by √ν_c) makes a ridge λ relative to the kernel's scale.
"""

from __future__ import annotations

import torch

from .. import validate as V
from ..errors import DNTKError


def class_scale(*, features: torch.Tensor | None = None, kernels: torch.Tensor | None = None,
                check: bool = True) -> torch.Tensor:
    """ν_c, float64 [C], from training features [C, m, k] or training kernels [C, m, m] (one of
    them; a single [m, k] / [m, m] is treated as C = 1). With ``check`` a zero ν (all of a class's
    gradients vanish) is a DNTKError."""
    if (features is None) == (kernels is None):
        raise DNTKError("class_scale takes features [C, m, k] or kernels [C, m, m], exactly one of them")
    if features is not None:
        f = V.tensor(features, "features", ndim=(2, 3), where="class_scale").detach().double()
        f = f[None] if f.dim() == 2 else f
        nu = (f * f).sum(2).mean(1)
    else:
        K = V.kernel(kernels, "kernels", where="class_scale").detach()
        K = K[None] if K.dim() == 2 else K
        nu = torch.diagonal(K, dim1=-2, dim2=-1).mean(1)
    if check and not bool((nu > 0).all()):
        bad = torch.nonzero(~(nu > 0)).flatten().tolist()
        raise DNTKError(f"the training kernel of class(es) {bad[:10]} has a zero diagonal (all gradients vanish); "
                        "check that every logit depends on trainable weights, or drop the class")
    return nu.cpu()


def shared_normalisation(train, test):
    """Divide each class's train and test features by √ν_c of the *training* features, so that one
    absolute ridge means the same for every subset or synthetic set drawn from them.

    train, test: :class:`~dntk.features.FeatureResult` (features [C, m, k] / [C, n, k]).
    Returns (train float64, test float64, ν [C])."""
    nu = class_scale(features=train.features)
    return train.scaled(nu.sqrt()), test.scaled(nu.sqrt()), nu
