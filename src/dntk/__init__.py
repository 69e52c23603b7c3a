"""dntk — the distilled neural tangent kernel of trained PyTorch classifiers.

The public surface, in pipeline order (each a subpackage, loaded on first use)::

    dntk.samples       the input forms: a tensor, a tuple or a dict of tensors, PaddedTokens (token ids)
    dntk.data          ImageSet, SampleSet, as_sample_set (any torch Dataset), hf_disk, load_configured
    dntk.models        build_model_spec (--model: torchvision:, timm:, hf:, factories), load_checkpoint
    dntk.training      train, evaluate, load_or_train_teacher, train_student
    dntk.distill       stage 1: distill_dataset (wmdd / random / kcenter / kernel-greedy), DistilledSet
    dntk.features      gradient_features → FeatureResult [C, n, k]; empirical_ntk (exact, float64)
    dntk.projection    make(name, k, seed): identity / gaussian / rademacher / sjlt / tensorsketch
    dntk.kernels       PerClassKRR, class_scale (ν_c), krr_curve, rank_curve, fit_evaluate
    dntk.spectral      spectra, truncation ranks, local–global structure, coverage gap
    dntk.gradient_distillation  stage 3: distill_gradients (Algorithm 1 and baselines), budget_curves, grid_search
    dntk.metrics       fidelity, accuracy, MSE, conditioning, kernel errors
    dntk.store         digests, atomic writes, cached results, FeatureStore
    dntk.config        RunConfig and the per-stage settings the CLI flags come from
    dntk.pipeline      run(RunConfig, model=, train_set=, test_set=) → RunResult (results.json)
    dntk.report        figures and the console table

Shortcuts: ``dntk.train``, ``dntk.gradient_features``, ``dntk.empirical_ntk``, ``dntk.FeatureResult``,
``dntk.run``, ``dntk.RunConfig``, ``dntk.RunResult``, ``dntk.DNTKError``.

Shape conventions: features are [C, n, k] (logit, sample, feature); kernels are [C, n1, n2];
targets and logits are [n, C].
"""

from __future__ import annotations

import importlib

from .errors import DNTKError

__version__ = "0.1.0"

SUBPACKAGES = ("samples", "data", "models", "training", "distill", "features", "projection", "kernels", "spectral",
               "gradient_distillation", "gradients",
               "metrics", "store", "config", "pipeline", "report", "resources", "errors")
_SHORTCUTS = {"train": "training", "gradient_features": "features", "empirical_ntk": "features", "FeatureResult": "features",
              "check_model": "features",
              "run": "pipeline", "RunResult": "pipeline", "RunConfig": "config"}

__all__ = list(SUBPACKAGES) + list(_SHORTCUTS) + ["DNTKError", "__version__"]


def __getattr__(name: str):
    if name in SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _SHORTCUTS:
        return getattr(importlib.import_module(f"{__name__}.{_SHORTCUTS[name]}"), name)
    raise AttributeError(f"module 'dntk' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
