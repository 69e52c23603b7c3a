"""Kernel models on per-class NTK features."""

from .krr import PerClassKRR, one_hot

__all__ = ["PerClassKRR", "one_hot"]
