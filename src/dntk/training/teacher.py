"""The teacher every verb uses, and the student trained on a distilled set: defaults per dataset,
the training recipes, load-or-train.

Recipes (:class:`~dntk.training.TrainConfig`):
- teacher: SGD (or AdamW) with the one-cycle cosine schedule, ``crop_flip`` augmentation
  (``shift`` for digits, where flips change the class), 30 epochs on digits and 15 otherwise;
- student: a fresh network of the teacher's architecture trained on the distilled images only with
  AdamW (lr 2e-3, weight decay 0.01, batch ≤ 64) and the teacher's temperature-4 soft labels —
  by default recomputed on every augmented batch (WMDD's FKD-style relabelling), or fixed per image.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import DNTKError
from .. import samples
from ..models import build_model_spec, call_factory, load_checkpoint
from ..store import atomic_json, digest, model_checksum
from .loop import TrainConfig, TrainResult, evaluate, train


def default_model(dataset: str) -> str:
    return "small_cnn" if dataset == "digits" else "resnet18"


def default_image_size(dataset: str) -> int | None:
    if dataset == "hf-disk":
        return None   # token data
    return 8 if dataset == "digits" else 64


def default_epochs(dataset: str) -> int:
    return 30 if dataset == "digits" else 15


def augmentation(dataset: str) -> str:
    return "shift" if dataset == "digits" else "crop_flip"


def teacher_train_config(dataset: str, cfg, seed: int = 0, images: bool = True) -> TrainConfig:
    """The teacher recipe for ``dataset`` with the settings of a :class:`dntk.config.TeacherConfig`;
    data that is not images (``images=False``: token ids, tuples, ...) is not augmented. The best
    validation epoch is kept, or the last one when ``cfg.val_fraction`` is 0."""
    return TrainConfig(epochs=cfg.epochs if cfg.epochs is not None else default_epochs(dataset),
                       optimizer=cfg.optimizer, lr=cfg.lr, seed=seed, batch_size=cfg.train_batch_size,
                       augment=augmentation(dataset) if images else "none",
                       select="best" if getattr(cfg, "val_fraction", 0.1) > 0 else "last",
                       pipeline=getattr(cfg, "train_pipeline", "auto"))


def validation_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices) of a training set with ``labels`` [n]: round(fraction · n_c) of
    each class c — at least 1 and at most n_c − 1, none of a class with one sample — drawn by a generator
    seeded with ``seed``, both sorted. fraction 0: everything trains, nothing validates."""
    if not (isinstance(fraction, (int, float)) and not isinstance(fraction, bool) and 0 <= fraction <= 0.5):
        raise DNTKError(f"the validation fraction must be a number in [0, 0.5], got {fraction!r}")
    labels = torch.as_tensor(labels).long().flatten()
    if fraction == 0:
        return torch.arange(labels.numel()), torch.zeros(0, dtype=torch.long)
    gen = torch.Generator().manual_seed(int(seed))
    val = []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        n_c = idx.numel()
        take = 0 if n_c < 2 else min(max(1, round(fraction * n_c)), n_c - 1)
        val.append(idx[torch.randperm(n_c, generator=gen)[:take]])
    val = torch.cat(val).sort().values
    keep = torch.ones(labels.numel(), dtype=torch.bool)
    keep[val] = False
    return torch.nonzero(keep).flatten(), val


def build_network(cfg, dataset: str, image_size: int | None, like, *, fresh: bool = False,
                  factory=None) -> nn.Module:
    """A network of the configured ``--model`` (:func:`dntk.models.build_model_spec`) for data shaped like
    ``like`` (an ImageSet or SampleSet: C classes, image channels or none). fresh: a new initialisation
    (for an ``hf:`` folder, its architecture without its weights: a student). factory: instead, a
    callable called with num_classes=C (the ``student=`` of :func:`dntk.run`)."""
    shape = getattr(like, "image_shape", None)
    in_channels = shape[0] if shape else None
    size = image_size if image_size is not None else default_image_size(dataset)
    if size is None and shape:
        size = shape[-1]
    if factory is not None:
        return call_factory(factory, like.num_classes, in_channels, size, what="student=")
    return build_model_spec(cfg.model or default_model(dataset), like.num_classes, in_channels=in_channels,
                            image_size=size or 224, stem=cfg.stem, pretrained=getattr(cfg, "pretrained", False),
                            fresh=fresh, allow_new=getattr(cfg, "train_teacher", "auto") == "always")


@dataclass
class Teacher:
    """model: in eval mode on the device; source: the checkpoint it came from; trained: the
    TrainResult when it was trained here (None when loaded); checksum: :func:`dntk.store.model_checksum`."""

    model: nn.Module
    source: str
    trained: TrainResult | None
    checksum: str
    validation: dict | None = None   # how the kept epoch was chosen: fraction, n_train, n_val, seed, selection


def data_fingerprint(data) -> str:
    """A content key of a training set: its size, labels, 16 samples spread over it (their inputs as the
    model sees them: size, dtype and values) and, for image folders, every file's relative path, size and
    SHA-1 (:func:`dntk.data.sources.folder_content_key`: a replaced or edited image changes it; a copy or
    a new modification time does not)."""
    n = len(data)
    pick = torch.linspace(0, n - 1, min(16, n)).round().long()
    x, _ = data.tensors(pick)
    from ..data.sources import folder_content_key

    paths = [f for f in getattr(data, "files", None) or [] if os.path.exists(f)]
    # the files' bytes, with paths relative to the data's own root: the same folder named another way
    # (relative, absolute, another working directory), copied or re-provisioned is the same data
    files = folder_content_key(paths) if paths else []
    return digest(n, data.labels, x, files)


def teacher_folder(out_dir, cfg, model: nn.Module, weights_given: bool, data=None) -> Path:
    """Where the teacher is trained, keyed by the ``--model``, ``--stem``, ``--pretrained``, the training
    data (:func:`data_fingerprint`: another image size, resize, data set or edited image is another key)
    and — when training starts from given weights — their checksum, so a teacher is never reused for
    other inputs: ``OUT/teacher`` for a built-in trained from scratch when that folder is new or holds
    this key (``key.json``), else ``OUT/teacher-<key>``. (The training recipe is checked by the training
    loop itself: another recipe retrains in the folder.)"""
    from ..models.registry import BUILTIN

    pretrained = getattr(cfg, "pretrained", False)
    init = model_checksum(model) if weights_given or pretrained else None
    fingerprint = data_fingerprint(data) if data is not None else None
    key = digest(cfg.model, getattr(cfg, "stem", None), pretrained, init, fingerprint)
    if cfg.model in BUILTIN and not pretrained and not weights_given:
        # OUT/teacher as before — but only for the data and model it was trained on (its key.json): another
        # image size, resize, data set or stem trains its own teacher-<key> instead of reusing this one
        folder = Path(out_dir) / "teacher"
        record = folder / "key.json"
        if not folder.exists():
            atomic_json({"key": key, "model": cfg.model, "stem": getattr(cfg, "stem", None)}, record)
            return folder
        try:
            held = json.loads(record.read_text()).get("key")
        except (OSError, ValueError, AttributeError):   # missing (an older dntk), torn or zero-byte
            held = None
            warnings.warn(f"{record} is missing or unreadable, so what {folder} was trained on is unknown; training "
                          f"teacher-{key} beside it instead of reusing it", RuntimeWarning, stacklevel=3)
        if held == key:
            return folder
    return Path(out_dir) / f"teacher-{key}"


def load_or_train_teacher(cfg, dataset: str, image_size: int | None, train_set, out_dir, *, seed: int = 0,
                          device="cpu", progress: bool = True, model: nn.Module | None = None,
                          check=None) -> Teacher:
    """The teacher of a :class:`dntk.config.TeacherConfig`: ``model`` when given (a model object, used
    as it is), else the ``--model`` built (an ``hf:`` folder with its weights) and loaded from
    ``cfg.checkpoint``; trained and cached in :func:`teacher_folder` when ``cfg.train_teacher`` says so —
    ``auto``: only when no weights were given — a finished run there with the same recipe is reused, an
    interrupted one resumed.

    Training holds out ``cfg.val_fraction`` of each class of ``train_set`` (:func:`validation_split`, seeded
    by ``seed``) and keeps the epoch best on that held-out part; the test split is never seen, so the
    accuracy a caller reports on it is honest. ``Teacher.validation`` says what was held out.
    check: a callable given the built network before any training (e.g. to refuse ``--k`` > P at once)."""
    from ..models.registry import parse_model

    torch.manual_seed(seed)  # the initial weights: the same teacher from every verb for the same --seed
    given = model is not None
    if model is None:
        model = build_network(cfg, dataset, image_size, train_set)
    if cfg.checkpoint:
        load_checkpoint(model, cfg.checkpoint)
    weights_given = given or bool(cfg.checkpoint) or (cfg.model is not None and parse_model(cfg.model).carries_weights)
    if check is not None:
        check(model)
    mode = getattr(cfg, "train_teacher", "auto")
    if mode == "always" or (mode == "auto" and not weights_given):
        fraction = getattr(cfg, "val_fraction", 0.1)
        fit, held = validation_split(train_set.labels, fraction, seed)
        fit_set = train_set.subset(fit) if held.numel() else train_set
        val_set = train_set.subset(held) if held.numel() else None
        folder = teacher_folder(out_dir, cfg, model, weights_given, fit_set)
        images = getattr(train_set, "image_shape", None) is not None
        recipe = teacher_train_config(dataset, cfg, seed, images)
        if val_set is None:
            recipe.select = "last"
        trained = train(model, fit_set, val_set, recipe, folder, device=device, progress=progress)
        source = str(folder / "best.pt")
        validation = {"fraction": fraction, "n_train": len(fit), "n_val": int(held.numel()), "seed": seed,
                      "selection": "best validation accuracy" if val_set is not None else "last epoch",
                      "epoch": trained.best_epoch, "val_accuracy": trained.best_accuracy}
    else:
        trained, validation = None, None
        source = str(cfg.checkpoint) if cfg.checkpoint else ("model object" if given else cfg.model)
    model.to(device).eval()
    return Teacher(model, source, trained, model_checksum(model), validation)


def student_train_config(dataset: str, epochs: int, seed: int, n: int, eval_every: int = 1,
                         images: bool = True) -> TrainConfig:
    return TrainConfig(epochs=epochs, optimizer="adamw", batch_size=min(64, n), seed=seed, weight_decay=0.01,
                       augment=augmentation(dataset) if images else "none", eval_every=eval_every)


def wmdd_student_config(epochs: int, seed: int, n: int, eval_every: int = 1, dataset: str = "folder") -> TrainConfig:
    """WMDD's student protocol (its run.sh / train_FKD.py, SRe2L's recipe): AdamW lr 1e-3, weight decay
    0.01, cosine schedule, batch 100, RandomResizedCrop(0.08–1) + flip, CutMix on every batch, KL to the
    teacher's softmax at temperature 20 (relabelled per batch: the caller passes the teacher);
    WMDD's epoch count is 300. Data whose class a flip can change (digits) get the crops without flips."""
    return TrainConfig(epochs=epochs, optimizer="adamw", lr=1e-3, weight_decay=0.01, batch_size=min(100, n),
                       seed=seed, augment="rrc_flip" if augmentation(dataset) == "crop_flip" else "rrc", mix="cutmix", schedule="cosine", soft_label_temperature=20.0,
                       eval_every=eval_every)


STUDENT_PROTOCOLS = ("dntk", "wmdd")


def train_student(student: nn.Module, teacher: nn.Module, distilled, test_set, out_dir, *, dataset: str, epochs: int,
                  seed: int = 0, relabel: bool = True, eval_every: int = 1, device="cpu",
                  progress: bool = True, protocol: str = "dntk", pipeline: str = "auto") -> tuple[nn.Module, float]:
    """Train ``student`` (a fresh network) on the images of ``distilled`` (a DistilledSet or ImageSet)
    with the teacher's soft labels — relabelled on every augmented batch, or (relabel=False) fixed
    per image — and return (student in eval mode, its test accuracy). The final epoch is kept (no epoch is
    chosen on the test split); ``eval_every`` is accepted for older callers and has no effect. Cached and
    resumable in out_dir.
    protocol: ``dntk`` (:func:`student_train_config`: AdamW 2e-3, one-cycle, pad-crop-flip, T = 4) or
    ``wmdd`` (:func:`wmdd_student_config`; relabel must be True, as in WMDD).
    pipeline: :attr:`TrainConfig.pipeline` (``auto``: the device pipeline on CUDA)."""
    torch.manual_seed(seed)
    images = getattr(distilled, "image_shape", None) is not None
    if protocol == "wmdd":
        if not images:
            raise DNTKError("the wmdd student protocol crops and mixes images (RandomResizedCrop, CutMix); this data is "
                            "not images — use --student-protocol dntk")
        if not relabel:
            raise DNTKError("the wmdd student protocol relabels every batch; relabel=False is not part of it")
        cfg = wmdd_student_config(epochs, seed, len(distilled), eval_every, dataset)
    elif protocol == "dntk":
        cfg = student_train_config(dataset, epochs, seed, len(distilled), eval_every, images)
    else:
        raise DNTKError(f"unknown student protocol {protocol!r}; use one of {STUDENT_PROTOCOLS}")
    if relabel:
        labels = {"teacher": teacher.eval()}
    else:
        with torch.no_grad():
            labels = {"soft_labels": samples.call(teacher.eval(), samples.to(distilled.tensors()[0], device)).cpu()}
    cfg.select = "last"   # the final epoch, evaluated once: no epoch is chosen on the test split
    cfg.pipeline = pipeline
    train(student, distilled, None, cfg, out_dir, device=device, progress=progress, **labels)
    student.eval()
    return student, evaluate(student, test_set, device=device)[0]
