"""Spectral analysis of per-class NTK kernels (paper §3): spectra, truncation ranks, redundancy,
the local–global structure and its coverage gap."""

from .analysis import (LocalGlobal, alignment_matrix, check_kernel, check_tau, cluster_kernel, containment_curves,
                       coverage, coverage_gap, data_redundancy, eigh_desc, local_global_structure, own_class_blocks,
                       parameter_redundancy, truncation_rank, variance_heatmap)
from .summary import ALL_POINTS, OWN_CLASS, SPECTRUM_LABELS, local_global_summary, spectral_summary
from .theory import energy_gap, row_basis, second_moment_spectrum, subspace_diagnostics, top_pca_directions

__all__ = ["eigh_desc", "truncation_rank", "data_redundancy", "own_class_blocks", "parameter_redundancy",
           "cluster_kernel", "LocalGlobal", "local_global_structure", "alignment_matrix", "coverage",
           "containment_curves", "variance_heatmap", "coverage_gap", "check_kernel", "check_tau",
           "spectral_summary", "local_global_summary", "ALL_POINTS", "OWN_CLASS", "SPECTRUM_LABELS", "energy_gap", "row_basis",
           "second_moment_spectrum", "top_pca_directions", "subspace_diagnostics"]
