"""Reports: figures and tables built from computed results (no kernel computation here)."""

from .figures import figure1

__all__ = ["figure1"]
