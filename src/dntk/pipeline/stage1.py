"""Stage 1 glue of ``dntk run`` / ``dntk distill``: from a :class:`dntk.config.DistillConfig` to the kernel
model's m training points (a real subset, a loaded set, or one distilled here), the kernel-aware
selection's options from the run's feature and kernel settings, and a distilled set judged by a student
trained on it under WMDD's protocol. The distillers themselves are :mod:`dntk.distill`'s (library);
this module is the application layer above them and :mod:`dntk.config`."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import samples
from ..config import KernelConfig, RunConfig
from ..data import balanced_indices
from ..distill import CRITERIA, DistilledSet, distill_dataset, load_distilled
from ..errors import DNTKError
from ..projection import make as make_projector
from ..store import atomic_json, digest, model_checksum, read_json
from ..training import build_network, evaluate, train_student

__all__ = ["TrainingPoints", "distilled_folder", "kernel_options", "student_evaluation", "train_student_base",
           "training_points"]


def kernel_options(cfg, features_cfg, teacher, seed: int, kernel_cfg=None) -> dict | None:
    """The ``kernel_options`` of :func:`distill_dataset` for a :class:`dntk.config.DistillConfig` whose
    method is kernel-aware (None otherwise): the projector the kernel model will use (from the
    :class:`dntk.config.FeatureConfig` and the run's seed), the pool factor, the batch size, and from the
    :class:`dntk.config.KernelConfig` (default: its defaults) the ridge and the targets the kernel model
    regresses — the selection optimises the very model that is fitted next (on the teacher's kernel)."""
    if cfg.method not in CRITERIA:
        return None
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


def student_evaluation(folder, teacher, cfg, test_set) -> dict:
    """Train a student of the teacher's architecture on the distilled set in ``folder`` under WMDD's own
    protocol (:func:`dntk.training.wmdd_student_config`, ``cfg.distill.evaluate_epochs`` epochs; cached
    and resumable in folder/student-wmdd-e<epochs>-<digest of images and teacher>) and record {protocol, epochs, accuracy,
    teacher_accuracy, seconds} under ``evaluation`` in the folder's manifest.json. cfg: a RunConfig."""
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


def train_student_base(cfg: RunConfig, teacher, points: TrainingPoints, train_set, test_set, out: Path, progress: bool,
             factory=None):
    """The base model ``student``: trained on the distilled images only (cached under OUT/student-<key>); a
    fresh network from the --model spec, or from ``factory`` (the student= of :func:`run`)."""
    ds = DistilledSet.from_normalised(points.images, points.labels, train_set, cfg.distill.method)
    torch.manual_seed(cfg.seed)
    student = build_network(cfg.teacher, cfg.data.dataset, cfg.data.image_size, train_set, fresh=True,
                            factory=factory)

    protocol, epochs = cfg.teacher.student_protocol, cfg.teacher.student_epochs
    key = digest(teacher.checksum, digest(points.images)) if protocol == "dntk" else \
        digest(teacher.checksum, digest(points.images), protocol, epochs, cfg.seed)
    folder = out / f"student-{key}"
    model, acc = train_student(student, teacher.model, ds, test_set, folder, dataset=cfg.data.dataset, epochs=epochs,
                               seed=cfg.seed, device=cfg.device, progress=progress, protocol=protocol,
                               eval_every=epochs if protocol == "wmdd" else 1, pipeline=cfg.teacher.train_pipeline)
    return model, acc, folder
