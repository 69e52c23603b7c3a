"""The one feature object: what :func:`dntk.gradient_features` returns, the feature store saves and
the kernel model, spectral analysis and gradient distillation consume."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ..errors import DNTKError
from ..projection import Projector


def class_kernels(F: torch.Tensor, G: torch.Tensor | None = None) -> torch.Tensor:
    """Per-class kernels F_c G_cᵀ in float64: F [C, n, k], G [C, n', k] (default F) → [C, n, n']."""
    f = F.double()
    g = f if G is None else G.double()
    return f @ g.transpose(-1, -2)


@dataclass
class FeatureResult:
    """Projected per-sample, per-logit gradients of a classifier.

    features: float32 [C', n, k] — row i of features[j] is the sketch of ∇θ f_{classes[j]}(x_i).
    logits: float32 [n, C] — the model's outputs (eval mode) from the same pass.
    labels: int64 [n] when the inputs carried labels, else None.
    classes: the logit indices along the first axis of ``features``.
    projector: the projector used (its name, k and seed reproduce the features); None when the
        features were scaled or built outside dntk.
    paths: {parameter name: how its per-sample gradient was computed} — ``factored``, ``closed``,
        ``derived``, ``op-vjp`` (joined by ``+`` when a parameter is used in several ways), ``func``
        for the whole-model torch.func backend, ``none`` when no gradient reached it; see
        :mod:`dntk.features.capture`.
    num_params: {parameter name: element count}.
    engine_seconds: wall seconds of the per-call engine per phase — ``record`` (the recorded forward),
        ``check`` (layout measurement or verification, samples run alone), ``backward`` (per-logit backward
        passes), ``emit`` (the rules' per-sample gradients), ``project`` (the projector) — over every batch;
        empty for ``backend="func"``.
    """

    features: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor | None
    classes: list[int]
    projector: Projector | None
    paths: dict[str, str] = field(default_factory=dict)
    num_params: dict[str, int] = field(default_factory=dict)
    engine_seconds: dict[str, float] = field(default_factory=dict, compare=False, repr=False)

    def __len__(self) -> int:
        return self.features.shape[1]

    def path_shares(self) -> dict[str, float]:
        """Fraction of the trainable parameters (by count) whose gradient took each path."""
        total = sum(self.num_params.values()) or 1
        shares: dict[str, float] = {}
        for name, path in self.paths.items():
            shares[path] = shares.get(path, 0.0) + self.num_params.get(name, 0) / total
        return shares

    def kernel(self, c: int | None = None, other: "FeatureResult | None" = None) -> torch.Tensor:
        """Per-class kernels Φ_c Φ'_cᵀ in float64 (Φ' = ``other``'s features, default these):
        [C', n, n'], or [n, n'] for position c."""
        f = self.features
        g = f if other is None else other.features
        if g.shape[0] != f.shape[0] or g.shape[2] != f.shape[2]:
            raise DNTKError(f"kernel between features of shapes {tuple(f.shape)} and {tuple(g.shape)}: the logit and "
                            "feature axes must match")
        if c is not None:
            return class_kernels(f[c], g[c])
        return class_kernels(f, g)

    def subset(self, index) -> "FeatureResult":
        """The samples ``index`` (a slice, an index tensor or list, or a boolean mask [n]) of every array."""
        if isinstance(index, slice):
            pick = index
        else:
            pick = torch.as_tensor(index)
            if pick.dtype == torch.bool:   # a mask: its True positions (not 0/1 indices)
                if pick.shape != (len(self),):
                    raise DNTKError(f"subset: a boolean mask needs one entry per sample ({len(self)}), got shape "
                                    f"{tuple(pick.shape)}")
                pick = torch.nonzero(pick).flatten()
            elif pick.is_floating_point():
                raise DNTKError("subset: indices must be integers (or a boolean mask), not floats")
            pick = pick.long()
        return replace(self, features=self.features[:, pick], logits=self.logits[pick],
                       labels=None if self.labels is None else self.labels[pick])

    def scaled(self, scale: torch.Tensor) -> "FeatureResult":
        """Features of class j divided by scale[j] (float64) — e.g. √ν_c for a shared trace
        normalisation (:func:`dntk.kernels.class_scale`). The result has no projector."""
        s = torch.as_tensor(scale, dtype=torch.float64)
        if s.shape != (self.features.shape[0],):
            raise DNTKError(f"scale must have one entry per class ({self.features.shape[0]}), got shape {tuple(s.shape)}")
        return replace(self, features=self.features.double() / s[:, None, None], projector=None)

    @classmethod
    def concat(cls, parts: list["FeatureResult"]) -> "FeatureResult":
        """Samples of several results (same model, projector and classes) in order."""
        if not parts:
            raise DNTKError("nothing to concatenate")
        first = parts[0]
        for p in parts[1:]:
            if p.classes != first.classes or p.features.shape[2] != first.features.shape[2]:
                raise DNTKError("feature chunks disagree on classes or k; they come from different extractions")
        labels = None if any(p.labels is None for p in parts) else torch.cat([p.labels for p in parts])
        return replace(first, features=torch.cat([p.features for p in parts], 1),
                       logits=torch.cat([p.logits for p in parts]), labels=labels)
