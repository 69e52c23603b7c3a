"""Projectors by name: ``make(name, k=..., seed=...)``; the table of names is in :mod:`dntk.projection`."""

from __future__ import annotations

from ..errors import DNTKError
from .base import Projector
from .sketches import DenseProjector, IdentityProjector, SJLTProjector, TensorSketchProjector

DEFAULT = "tensorsketch"
NAMES = ("identity", "gaussian", "rademacher", "sjlt", "tensorsketch")


def make(name: str = DEFAULT, k: int | None = 4096, seed: int = 0, **options) -> Projector:
    """Build a projector by name.

    Args:
        name: one of ``identity``, ``gaussian``, ``rademacher``, ``sjlt``, ``tensorsketch``.
        k: output dimension (ignored by ``identity``, whose k is the parameter count P).
        seed: the map is a deterministic function of (seed, parameter names and shapes).
        options: ``s`` for ``sjlt`` (nonzeros per coordinate, default 1); ``cache_bytes`` for the
            dense maps; ``fft_max_bytes`` for ``tensorsketch``.
    """
    if name == "identity":
        return IdentityProjector(seed=seed)
    if name in ("gaussian", "rademacher"):
        return DenseProjector(k, seed, distribution=name, **options)
    if name in ("sjlt", "countsketch"):
        return SJLTProjector(k, seed, **options)
    if name == "tensorsketch":
        return TensorSketchProjector(k, seed, **options)
    raise DNTKError(f"unknown projector {name!r}; valid names: {', '.join(NAMES)}")

