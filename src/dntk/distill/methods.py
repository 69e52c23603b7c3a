"""One entry point for every stage-1 distiller."""

from __future__ import annotations

from ..errors import DNTKError
from .coresets import select_real
from .distilled import DistilledSet
from .kernel_select import CRITERIA, select_kernel_aware
from .wmdd import WMDDConfig, wmdd

DISTILLERS = ("random", "kcenter", "wmdd") + tuple(CRITERIA)


def distill_dataset(method: str, teacher, dataset, ipc: int, out_dir, *, seed: int = 0, device="cpu", progress=True,
                    teacher_checksum: str = "", kernel_options: dict | None = None, **wmdd_options) -> DistilledSet:
    """Distil ``dataset`` to ``ipc`` images per class with ``method`` (one of ``DISTILLERS``) and write
    the shared on-disk format to out_dir. ``wmdd_options``: the fields of :class:`WMDDConfig` other
    than ipc and seed (only for ``wmdd``). ``kernel_options`` (only for ``kernel-greedy`` /
    ``kernel-herding``, required there): ``projector`` and optionally ``pool_factor``, ``ridge``,
    ``batch_size``, ``pool_features`` — see :func:`dntk.distill.kernel_select.select_kernel_aware`."""
    if method == "wmdd":
        if kernel_options:
            raise DNTKError("kernel_options apply to kernel-greedy / kernel-herding, not to wmdd")
        return wmdd(teacher, dataset, WMDDConfig(ipc=ipc, seed=seed, **wmdd_options), out_dir, progress=progress,
                    device=device, teacher_checksum=teacher_checksum)
    if wmdd_options:
        raise DNTKError(f"options {sorted(wmdd_options)} apply to wmdd only, not to {method!r}")
    if method in CRITERIA:
        if not kernel_options or kernel_options.get("projector") is None:
            raise DNTKError(f"{method} needs kernel_options with the projector of the kernel model's features")
        return select_kernel_aware(dataset, ipc, method, teacher=teacher, seed=seed, out_dir=out_dir, device=device,
                                   progress=progress, **kernel_options)
    if kernel_options:
        raise DNTKError(f"kernel_options apply to kernel-greedy / kernel-herding, not to {method!r}")
    if method in ("random", "kcenter"):
        return select_real(dataset, ipc, method, teacher=teacher, seed=seed, out_dir=out_dir, device=device)
    raise DNTKError(f"unknown distillation method {method!r}; valid names: {', '.join(DISTILLERS)}")
