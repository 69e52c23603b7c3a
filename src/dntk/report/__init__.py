"""Reporting: figures and the console table. Plotting and formatting only — every number arrives
computed."""

from .console import KM_KEYS, format_results, gradient_stage_line
from .figures import figure1
from .reproduce_report import write_probe_report, write_reproduce_report
from .spectral_figures import (class_figure4, figure2, figure3, figure4, figure5, gradient_stage_figures,
                               pareto_figure)

__all__ = ["figure1", "figure2", "figure3", "figure4", "figure5", "pareto_figure", "gradient_stage_figures", "class_figure4",
           "format_results", "gradient_stage_line", "KM_KEYS", "write_reproduce_report", "write_probe_report"]
