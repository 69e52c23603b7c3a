"""One entry point for every stage-1 distiller."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import samples
from ..data import balanced_indices
from ..errors import DNTKError
from ..store import read_json
from .coresets import select_real
from .distilled import DistilledSet, load_distilled
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


def kernel_options(cfg, features_cfg, teacher, seed: int, kernel_cfg=None) -> dict | None:
    """The ``kernel_options`` of :func:`distill_dataset` for a :class:`dntk.config.DistillConfig` whose
    method is kernel-aware (None otherwise): the projector the kernel model will use (from the
    :class:`dntk.config.FeatureConfig` and the run's seed), the pool factor, the batch size, and from the
    :class:`dntk.config.KernelConfig` (default: its defaults) the ridge and the targets the kernel model
    regresses — the selection optimises the very model that is fitted next (on the teacher's kernel)."""
    if cfg.method not in CRITERIA:
        return None
    from ..config import KernelConfig
    from ..projection import make as make_projector

    kernel_cfg = kernel_cfg if kernel_cfg is not None else KernelConfig()
    return {"projector": make_projector(features_cfg.projector, k=features_cfg.resolved_k(teacher), seed=seed), "pool_factor": cfg.pool_factor,
            "batch_size": features_cfg.batch_size, "ridge": kernel_cfg.ridge, "targets": kernel_cfg.targets}


@dataclass
class TrainingPoints:
    """The kernel model's m training points: images [m, c, h, w] (normalised) — or any sample batch of
    :mod:`dntk.samples` (token ids, tuples) — and labels [m] in balanced order (every prefix is even
    across classes); distilled: the DistilledSet they came from, or None for a random real subset."""

    images: object
    labels: torch.Tensor
    distilled: DistilledSet | None
    manifest: dict | None = None

    def __len__(self) -> int:
        return samples.count(self.images)


def distilled_folder(out_dir, method: str, ipc: int, seed: int) -> Path:
    return Path(out_dir) / f"distill-{method}-ipc{ipc}-seed{seed}"


def training_points(cfg, m: int, train_set, *, teacher=None, teacher_checksum: str = "", seed: int = 0, out_dir=".",
                    device="cpu", progress: bool = True, features_cfg=None, kernel_cfg=None) -> TrainingPoints:
    """Stage 1 of ``dntk run`` for a :class:`dntk.config.DistillConfig`: a seeded random balanced subset
    of ``m`` real images (method ``none``), a distilled set loaded from ``cfg.load``, or one distilled
    here with ``cfg.method`` into ``out_dir/distill-<method>-ipc<ipc>-seed<seed>`` (cached, resumable).
    features_cfg: the run's :class:`dntk.config.FeatureConfig` (needed by the kernel-aware methods).
    The folder's manifest.json (settings, Jacobian cost, time) is returned with the points."""
    C = train_set.num_classes
    if cfg.method == "none" and not cfg.load:
        X, y = train_set.tensors(balanced_indices(train_set.labels, m, C, seed=seed))
        return TrainingPoints(X, y, None)
    folder = Path(cfg.load) if cfg.load else distilled_folder(out_dir, cfg.method, cfg.ipc, seed)
    if cfg.load:
        distilled = load_distilled(cfg.load)
    else:
        if cfg.method in CRITERIA and features_cfg is None:
            raise DNTKError(f"{cfg.method} needs the run's feature settings (features_cfg)")
        options = cfg.wmdd_options() if cfg.method == "wmdd" else {}
        distilled = distill_dataset(cfg.method, teacher, train_set, cfg.ipc, folder, seed=seed, device=device,
                                    progress=progress, teacher_checksum=teacher_checksum,
                                    kernel_options=kernel_options(cfg, features_cfg, teacher, seed, kernel_cfg),
                                    **options)
    distilled.check_compatible(train_set)
    X, y = distilled.tensors(balanced_indices(distilled.labels, len(distilled), C))
    manifest_path = (folder if folder.is_dir() else folder.parent) / "manifest.json"
    manifest = read_json(manifest_path)
    return TrainingPoints(X, y, distilled, manifest)


def evaluate_distilled(folder, teacher, cfg, test_set) -> dict:
    """Train a student of the teacher's architecture on the distilled set in ``folder`` under WMDD's own
    protocol (:func:`dntk.training.wmdd_student_config`, ``cfg.distill.evaluate_epochs`` epochs; cached
    and resumable in folder/student-wmdd-e<epochs>-<digest of images and teacher>) and record {protocol, epochs, accuracy,
    teacher_accuracy, seconds} under ``evaluation`` in the folder's manifest.json. cfg: a RunConfig."""
    import time

    from ..store import atomic_json, digest, model_checksum
    from ..training import build_network, evaluate, train_student

    folder = Path(folder)
    ds = load_distilled(folder)
    ds.check_compatible(test_set)
    epochs = cfg.distill.evaluate_epochs
    t0 = time.perf_counter()
    student = build_network(cfg.teacher, cfg.data.dataset, cfg.data.image_size, test_set)
    # keyed by the images and the teacher (a changed teacher or set trains a new student); evaluated once,
    # after the last epoch, so the accuracy is not the best of several looks at the test split
    key = digest(ds.images, model_checksum(teacher))
    _, acc = train_student(student, teacher, ds, test_set, folder / f"student-wmdd-e{epochs}-{key}",
                           dataset=cfg.data.dataset, epochs=epochs, seed=cfg.seed, eval_every=epochs, device=cfg.device,
                           progress=cfg.progress, protocol="wmdd", pipeline=cfg.teacher.train_pipeline)
    record = {"protocol": "wmdd", "epochs": epochs, "accuracy": acc, "seed": cfg.seed, "student": key,
              "teacher_accuracy": evaluate(teacher, test_set, device=cfg.device)[0],
              "seconds": time.perf_counter() - t0}
    manifest = json.loads((folder / "manifest.json").read_text())
    atomic_json({**manifest, "evaluation": record}, folder / "manifest.json", indent=1)
    return record
