"""Persistence: checkpoints, caches, distilled sets, feature chunks and results.json are written
through this module (figures and small logs such as a training history are written where they are made).

- :func:`digest` / :func:`model_checksum`: content keys (SHA-1, 16 hex digits) of tensors and
  JSON-able values; a cached result is keyed by everything it depends on.
- :func:`atomic_save` / :func:`atomic_json`: write to ``<path>.tmp`` and rename, so an interrupted
  write never leaves a half file under the real name.
- :func:`cached`: load ``path`` if present, else compute, save atomically and return.
- :class:`FeatureStore`: a folder of feature chunks (one :class:`~dntk.features.FeatureResult` per
  ``chunk`` samples, each saved atomically); an interrupted extraction resumes at the first missing
  chunk, and the chunks read back as one ``FeatureResult``.

Users: teacher/student training (checkpoints), WMDD (per-class resume files), distilled sets, the
decoded-image cache, ``dntk run`` (features, exact kernels, results.json) and the benchmarks.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import torch

from .errors import DNTKError, require_int


def digest(*parts) -> str:
    """16-hex-digit SHA-1 of tensors (their bytes) and JSON-able values (sorted keys), in order."""
    h = hashlib.sha1()
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def model_checksum(model: torch.nn.Module) -> str:
    """digest of a model's state dict (parameters and buffers, sorted by name)."""
    return digest(*[t for _, t in sorted(model.state_dict().items())])


def _tmp(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def atomic_save(obj, path) -> Path:
    """torch.save ``obj`` to ``path`` atomically (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    torch.save(obj, tmp)
    tmp.replace(path)
    return path


def _json_default(value):
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return float(value)  # numpy / torch scalars


def atomic_json(obj, path, indent: int = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically (paths become strings, numeric scalars floats)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp(path)
    tmp.write_text(json.dumps(obj, indent=indent, default=_json_default))
    tmp.replace(path)
    return path


def load(path, *, trusted: bool = True):
    """torch.load on CPU; ``trusted`` files (written by dntk itself) may hold Python objects."""
    return torch.load(path, map_location="cpu", weights_only=not trusted)


def cached(path, compute: Callable[[], object]):
    """The object saved at ``path``, or ``compute()`` saved there atomically first."""
    path = Path(path)
    if path.exists():
        return load(path)
    value = compute()
    atomic_save(value, path)
    return value


class FeatureStore:
    """A folder of projected features, ``chunk`` samples per atomically written file.

    ``FeatureStore(folder, chunk).extract(model, X, projector, ...)`` computes
    :func:`dntk.gradient_features` of ``X`` [n, ...] chunk by chunk, skipping chunks already on disk,
    and returns one :class:`~dntk.features.FeatureResult` (features [C, n, k], logits [n, C]).
    The folder name should carry a digest of everything the features depend on (model checksum,
    projector name/k/seed, the inputs); the store itself does not check it.
    """

    def __init__(self, folder, chunk: int = 1024):
        require_int(chunk, "chunk", 1, "choose how many samples one saved file holds")
        self.folder, self.chunk = Path(folder), chunk

    def chunk_path(self, start: int, stop: int) -> Path:
        """The file of samples [start, stop): the range is in the name, so chunks of another chunk size
        in the same folder are never mixed in."""
        return self.folder / f"chunk-{start:09d}-{stop:09d}.pt"

    def ranges(self, n: int) -> list[tuple[int, int]]:
        return [(s, min(n, s + self.chunk)) for s in range(0, n, self.chunk)]

    def missing(self, n: int) -> list[int]:
        """Start indices of the chunks of an n-sample extraction not yet on disk."""
        return [s for s, e in self.ranges(n) if not self.chunk_path(s, e).exists()]

    def extract(self, model, X: torch.Tensor, projector, *, batch_size: int = 32, device=None,
                progress: bool = True):
        from .features import FeatureResult, gradient_features

        n = X.shape[0]
        if n == 0:
            raise DNTKError("no inputs to extract features from")
        self.folder.mkdir(parents=True, exist_ok=True)
        parts = []
        for start, stop in self.ranges(n):
            path = self.chunk_path(start, stop)
            blob = cached(path, lambda: gradient_features(model, X[start:stop], projector, batch_size=batch_size,
                                                          device=device, progress=progress).state())
            part = FeatureResult.from_state(blob, projector)
            if len(part) != stop - start or part.features.shape[2] != projector.dim:
                raise DNTKError(f"{path} holds {len(part)} samples of k={part.features.shape[2]}, expected "
                                f"{stop - start} of k={projector.dim}; the folder mixes extractions — delete it")
            parts.append(part)
        return FeatureResult.concat(parts)
