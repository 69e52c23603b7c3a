"""What ``dntk run`` returns and writes to ``OUT/results.json`` (schema also in docs/results-schema.md)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..store import atomic_json


@dataclass
class RunResult:
    """The results of one ``dntk run``; ``results.json`` is ``asdict`` of this, key for key.

    config: the resolved :class:`dntk.config.RunConfig` by section (data, teacher, features, distill,
        kernel, gradients, device, seed, out, progress).
    teacher: {model, parameters P, test_accuracy, checksum, source (checkpoint path), best_epoch (None
        when loaded), validation (None when loaded: else fraction, n_train, n_val, seed, selection, epoch,
        val_accuracy — the held-out part of the training data that chose the epoch), train_seconds (wall seconds of its training summed over epochs, also when it was
        trained by an earlier invocation; None when loaded from --checkpoint or trained by an older dntk)}.
    base_model: the network whose NTK is analysed: {name ("teacher" | "student"), test_accuracy, checksum,
        train_seconds (the student's, as for the teacher; None for the teacher)}.
    projector: {name, k, seed}.
    gradient_paths: {engine path: share of the parameters (by count) whose gradient took it}
        (:meth:`dntk.FeatureResult.path_shares`).
    targets: "logits" or "onehot" — what the kernel model regresses.
    kernel_model: the per-class KRR on all m points: fidelity, accuracy, mse (against the regression
        targets), mse_vs_teacher_logits, condition_number, min_eigenvalue (trace-normalised kernel,
        averaged over classes).
    counts: {n_real, m, n_real_over_m, n_test, classes, per_sample_gradients = (m + n_test)·C,
        parameters, k}.
    curves: {"projected": rows over the m grid (Figure 1), plus "teacher" with a student base model and
        "exact" with --exact}; a row is {m, the kernel_model keys}.
    distillation: None, or {method, ipc, m, jacobians_saved = n_real/m, stage1_jacobian_images (images whose
        Jacobians stage 1 computed: the kernel-aware methods' pool, else 0), stage1_per_logit_gradients,
        jacobians_saved_with_stage1 = n_real / (m + stage-1 images), seconds, source (a loaded folder)}.
    kernel_model_teacher: with a student base model, the teacher's kernel model on the same points.
    exact: with --exact, {kernel_relative_error, kernel_alignment (of the projected training kernel
        against the exact eNTK), kernel_model (the exact eNTK's KRR)}.
    gradient_distillation: with --gradient-distill, stage 3's summary
        (:func:`dntk.pipeline.stage3.gradient_stage`).
    timings_s: wall-clock seconds per stage; peak_memory_mb: the process's peak RSS; stage_memory_mb:
        {"rss": {stage: peak RSS during it}, "gpu": {stage: peak CUDA memory allocated}} (Linux; see
        :class:`dntk.resources.StageTimer`).
    environment: what the numbers depend on beyond the config (:func:`dntk.resources.environment`): threads,
        interop_threads, device, device_name, dntk, torch, cuda, numpy, python and platform versions,
        world_size (torchrun processes), data {train, test}: content keys of the two splits
        (:func:`dntk.training.teacher.data_fingerprint`), and features_computed_with {train, test}: the
        thread counts, devices and world sizes the stored feature shards were computed with
        (:meth:`dntk.store.FeatureStore.computed_with`; more than one of a kind after a resumed extraction).
    """

    config: dict
    teacher: dict
    base_model: dict
    projector: dict
    gradient_paths: dict
    targets: str
    kernel_model: dict
    counts: dict
    curves: dict
    distillation: dict | None = None
    kernel_model_teacher: dict | None = None
    exact: dict | None = None
    gradient_distillation: dict | None = None
    timings_s: dict | None = None
    peak_memory_mb: float | None = None
    stage_memory_mb: dict | None = None
    environment: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path) -> Path:
        return atomic_json(self.to_dict(), path)

    @classmethod
    def load(cls, path) -> "RunResult":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            from ..errors import DNTKError

            raise DNTKError(f"cannot read {path} as a dntk results.json ({e}); rerun the job that wrote it") from None
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
