"""Stage 1 — data distillation: WMDD, real-image baselines, and the shared on-disk format."""

from .coresets import covering_radius, kcenter_greedy, select_real
from .store import DistilledSet, check_ipc, load_distilled, save_distilled
from .wmdd import (WMDDConfig, barycenter, bn_layers, class_bn_statistics, class_features, wasserstein2, wmdd,
                   wmdd_objective)

METHODS = ("random", "kcenter", "wmdd")


def distill(method: str, teacher, dataset, ipc: int, out_dir, *, seed: int = 0, device="cpu", progress=True,
            teacher_checksum: str = "", **wmdd_options) -> DistilledSet:
    """One entry point for every distiller; writes the shared format to out_dir."""
    from ..errors import DNTKError

    if method == "wmdd":
        return wmdd(teacher, dataset, WMDDConfig(ipc=ipc, seed=seed, **wmdd_options), out_dir, progress=progress,
                    device=device, teacher_checksum=teacher_checksum)
    if method in ("random", "kcenter"):
        return select_real(dataset, ipc, method, teacher=teacher, seed=seed, out_dir=out_dir, device=device)
    raise DNTKError(f"unknown distillation method {method!r}; valid names: {', '.join(METHODS)}")


__all__ = ["distill", "wmdd", "WMDDConfig", "barycenter", "class_bn_statistics", "class_features", "wasserstein2",
           "wmdd_objective", "bn_layers", "select_real", "kcenter_greedy", "covering_radius", "DistilledSet",
           "load_distilled", "save_distilled", "check_ipc", "METHODS"]
