"""What a pipeline settles before its long work: the up-front refusals (output folder, data, --k,
--budget), the data itself, the one name of a feature store, and the extraction's announced cost.

A feature store's folder is ``OUT/features-<split>-<key>-<digest of the inputs>``, the key a digest of
the store format, the model's checksum, the projector's name, k and the seed (:func:`feature_folder`) —
every pipeline module names its stores through it, so a run and ``dntk reproduce`` find each other's."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..config import RunConfig
from ..data import load_configured
from ..errors import DNTKError
from ..store import digest

FEATURE_FORMAT = "feature-store-v3"   # part of every feature folder's key: the sharded memmap store


def feature_key(checksum: str, projector: str, k: int, seed: int) -> str:
    """The key of a model's projected features: store format, model checksum, projector name, k, seed."""
    return digest(FEATURE_FORMAT, checksum, projector, k, seed)


def feature_folder(out, split: str, key: str, X) -> Path:
    """OUT/features-<split>-<key>-<digest(X)>: the store of the features of inputs X under ``key``
    (:func:`feature_key`)."""
    return Path(out) / f"features-{split}-{key}-{digest(X)}"


def check_out(out) -> None:
    """Refuse an output folder dntk cannot use, before any work: a file, a path under a file, a folder it
    cannot create or write in, or one whose results.json is a folder."""
    import os
    import tempfile

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DNTKError(f"--out {out} is a file; name a folder (it is created when missing)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".dntk-write-test-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise DNTKError(f"--out {out} cannot be written ({e.strerror or e}); choose a folder you can write") from None
    if (out / "results.json").is_dir():
        raise DNTKError(f"{out / 'results.json'} is a folder; dntk writes its results there — move it away")


def check_k(cfg: RunConfig, model: torch.nn.Module) -> int:
    """P, the model's trainable parameters; refuses --k > P (checked on the built network, before training)."""
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if cfg.features.k is not None and cfg.features.projector != "identity" and cfg.features.k > P:
        raise DNTKError(f"--k {cfg.features.k} is larger than the model's P = {P:,} parameters; choose k < {P}")
    return P


def check_data(train_set, test_set) -> None:
    """Every class has training samples, and there are at least two (checked before the teacher trains)."""
    C = train_set.num_classes
    counts = torch.bincount(train_set.labels, minlength=C)
    if C < 2:
        raise DNTKError(f"the training data has {C} class ({list(train_set.classes)}); a classifier's kernel needs "
                        "at least two")
    empty = [str(train_set.classes[c]) for c in range(C) if counts[c] == 0]
    if empty:
        raise DNTKError(f"class{'es' if len(empty) > 1 else ''} {', '.join(empty[:5])} "
                        f"{'have' if len(empty) > 1 else 'has'} no training samples; add some or drop the class")
    if len(test_set) == 0:
        raise DNTKError("the test split is empty; the kernel model is measured on it — add test samples")


def check_budget(cfg: RunConfig, m: int, what: str) -> None:
    """Refuse --budget s > m (the stage-3 budget cannot exceed the training points)."""
    if cfg.gradients.budget is not None and cfg.gradients.budget > m:
        raise DNTKError(f"--budget {cfg.gradients.budget} is larger than m = {m} ({what}); choose s ≤ {m}")


def load_data(cfg: RunConfig, train_set, test_set, model, out: Path, progress: bool):
    """(train, test): the given data sets (as SampleSets unless already Image/SampleSets; the test set cut
    to --n-test even over classes), or the configured ones. Ragged token ids are padded with the model's
    pad token (:func:`dntk.models.pad_token_id`)."""
    from ..data import SampleSet, as_sample_set, balanced_indices
    from ..models import pad_token_id

    if (train_set is None) != (test_set is None):
        raise DNTKError("pass both train_set and test_set, or neither (then config.data says where the data is)")
    pad = pad_token_id(model, cfg.teacher.model)   # ragged token ids are padded with the model's pad token
    if train_set is None:
        return load_configured(cfg.data, cache_dir=out / "cache", progress=progress, pad_id=pad)
    train, test = as_sample_set(train_set, pad_id=pad), as_sample_set(test_set, pad_id=pad)
    if list(train.classes) != list(test.classes):
        if hasattr(train_set, "classes") or hasattr(test_set, "classes"):
            raise DNTKError(f"train_set and test_set have different classes ({train.classes[:5]} vs {test.classes[:5]}); "
                            "both need the same class list in the same order")
        names = [str(c) for c in range(max(train.num_classes, test.num_classes))]   # labels 0..C-1 of both sets
        train, test = (SampleSet(d.inputs, d.labels, names, d.name, d.info) for d in (train, test))
    if cfg.data.n_test is not None:
        test = test.subset(balanced_indices(test.labels, min(cfg.data.n_test, len(test)), test.num_classes))
    return train, test


def announce(log, model, X_train, X_test, store, projector, C: int, cfg: RunConfig, stream: bool, P: int) -> None:
    """What the extraction will compute — per-logit gradients, bytes stored — and its time estimated from
    one timed batch (which includes the engine's one-off layout checks, so it errs high)."""
    from ..features import gradient_features
    from ..samples import count, take

    n_train, n_test = count(X_train), count(X_test)
    n = n_train + n_test
    k = P if projector.name == "identity" else projector.dim
    stored = (n_train + (0 if stream else n_test)) * C * k * 4
    line = (f"features: {n_train:,} train + {n_test:,} test samples × {C} logits = {n * C:,} per-logit gradients, "
            f"{'exact (k = P' if projector.name == 'identity' else 'projected to (k'} = {k:,}) "
            f"({stored / 2**20:,.1f} MiB stored)")
    try:
        done = not store.missing(n_train)
    except DNTKError:
        done = False
    if not done:
        B = min(cfg.features.batch_size, n_train)
        t0 = time.perf_counter()
        gradient_features(model, take(X_train, slice(0, B)), projector, batch_size=B, device=cfg.device, progress=False)
        per = (time.perf_counter() - t0) / B
        line += f"; ≈ {duration(per * n)} at {per * 1e3:,.1f} ms per sample (timed on a first batch of {B})"
    log(line)


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else (f"{seconds / 60:.1f} min" if seconds < 7200 else
                                                     f"{seconds / 3600:.1f} h")
