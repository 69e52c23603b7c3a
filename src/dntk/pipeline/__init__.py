"""Orchestration of ``dntk run`` (stages in order, no computation of its own)."""

from .result import RunResult
from .run import run
from .stage3 import GradientStage, gradient_stage

__all__ = ["run", "RunResult", "gradient_stage", "GradientStage"]
