"""One entry point for every stage-1 distiller."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..data import balanced_indices
from ..errors import DNTKError
from .coresets import select_real
from .distilled import DistilledSet, load_distilled
from .wmdd import WMDDConfig, wmdd

DISTILLERS = ("random", "kcenter", "wmdd")


def distill_dataset(method: str, teacher, dataset, ipc: int, out_dir, *, seed: int = 0, device="cpu", progress=True,
                    teacher_checksum: str = "", **wmdd_options) -> DistilledSet:
    """Distil ``dataset`` to ``ipc`` images per class with ``method`` (one of ``DISTILLERS``) and write
    the shared on-disk format to out_dir. ``wmdd_options``: the fields of :class:`WMDDConfig` other
    than ipc and seed (only for ``wmdd``)."""
    if method == "wmdd":
        return wmdd(teacher, dataset, WMDDConfig(ipc=ipc, seed=seed, **wmdd_options), out_dir, progress=progress,
                    device=device, teacher_checksum=teacher_checksum)
    if wmdd_options:
        raise DNTKError(f"options {sorted(wmdd_options)} apply to wmdd only, not to {method!r}")
    if method in ("random", "kcenter"):
        return select_real(dataset, ipc, method, teacher=teacher, seed=seed, out_dir=out_dir, device=device)
    raise DNTKError(f"unknown distillation method {method!r}; valid names: {', '.join(DISTILLERS)}")


@dataclass
class TrainingPoints:
    """The kernel model's m training points: images [m, c, h, w] (normalised) and labels [m] in balanced
    order (every prefix is even across classes); distilled: the DistilledSet they came from, or None
    for a random real subset."""

    images: torch.Tensor
    labels: torch.Tensor
    distilled: DistilledSet | None

    def __len__(self) -> int:
        return self.images.shape[0]


def distilled_folder(out_dir, method: str, ipc: int, seed: int) -> Path:
    return Path(out_dir) / f"distill-{method}-ipc{ipc}-seed{seed}"


def training_points(cfg, m: int, train_set, *, teacher=None, teacher_checksum: str = "", seed: int = 0, out_dir=".",
                    device="cpu", progress: bool = True) -> TrainingPoints:
    """Stage 1 of ``dntk run`` for a :class:`dntk.config.DistillConfig`: a seeded random balanced subset
    of ``m`` real images (method ``none``), a distilled set loaded from ``cfg.load``, or one distilled
    here with ``cfg.method`` into ``out_dir/distill-<method>-ipc<ipc>-seed<seed>`` (cached, resumable)."""
    C = train_set.num_classes
    if cfg.method == "none" and not cfg.load:
        X, y = train_set.tensors(balanced_indices(train_set.labels, m, C, seed=seed))
        return TrainingPoints(X, y, None)
    if cfg.load:
        distilled = load_distilled(cfg.load)
    else:
        options = cfg.wmdd_options() if cfg.method == "wmdd" else {}
        distilled = distill_dataset(cfg.method, teacher, train_set, cfg.ipc,
                                    distilled_folder(out_dir, cfg.method, cfg.ipc, seed), seed=seed, device=device,
                                    progress=progress, teacher_checksum=teacher_checksum, **options)
    distilled.check_compatible(train_set)
    X, y = distilled.tensors(balanced_indices(distilled.labels, len(distilled), C))
    return TrainingPoints(X, y, distilled)
