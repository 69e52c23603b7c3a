"""End-to-end jobs behind the CLI verbs."""

from .run import RunConfig, format_results, run

__all__ = ["RunConfig", "run", "format_results"]
