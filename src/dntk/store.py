"""Persistence: checkpoints, caches, distilled sets, feature chunks and results.json are written
through this module (figures and small logs such as a training history are written where they are made).

- :func:`digest` / :func:`model_checksum`: content keys (SHA-1, 16 hex digits) of tensors and
  JSON-able values; a cached result is keyed by everything it depends on.
- :func:`atomic_save` / :func:`atomic_json` / :func:`atomic_write_text`: write to a temporary file, fsync it,
  rename it over the real name and fsync the folder, so an interrupted write (or a power loss) never leaves a
  half file under the real name; :func:`load_or_none` / :func:`read_json` read such files back, treating a
  torn or empty one as missing (with a warning) instead of raising.
- :func:`cached`: load ``path`` if present and readable, else compute, save atomically and return.
- :class:`FeatureStore`: features in fixed-size shards of memory-mapped ``.npy`` arrays with a JSON
  manifest and per-shard completion records (SHA-1 checksums); written by one or several processes,
  resumed at the missing shards, verified by ``dntk store verify``, read by class or index range.

Users: teacher/student training (checkpoints), WMDD (per-class resume files), distilled sets, the
decoded-image cache, ``dntk run`` (features, exact kernels, results.json) and the benchmarks.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import validate as V
from .errors import DNTKError, require_int


def digest(*parts) -> str:
    """16-hex-digit SHA-1 of tensors (dtype, shape and bytes), containers of them and JSON-able values
    (sorted keys), in order."""
    h = hashlib.sha1()
    for p in parts:
        _feed(h, p)
    return h.hexdigest()[:16]


def _feed(h, p) -> None:
    """Tensors by their dtype, shape and bytes (so a reshape, a bit-cast or a concatenation of two digested
    tensors is another key); tuples, lists and dicts holding tensors entry by entry, with the
    container's kind and keys (so {"a": x} and (x,) differ); other values as sorted JSON."""
    if isinstance(p, torch.Tensor):
        t = p.detach().cpu().contiguous()
        h.update(f"tensor:{t.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16).numpy().tobytes())
    elif isinstance(p, (tuple, list, dict)) and _holds_tensor(p):
        items = p.items() if isinstance(p, dict) else enumerate(p)
        h.update(f"{type(p).__name__}:{len(p)}:".encode())
        for k, v in items:
            h.update(json.dumps(k, default=str).encode())
            _feed(h, v)
    else:
        h.update(json.dumps(p, sort_keys=True, default=str).encode())


def _holds_tensor(p) -> bool:
    values = p.values() if isinstance(p, dict) else p
    return any(isinstance(v, torch.Tensor) or (isinstance(v, (tuple, list, dict)) and _holds_tensor(v)) for v in values)


def model_checksum(model: torch.nn.Module) -> str:
    """digest of a model's state dict (parameters and buffers, sorted by name)."""
    return digest(*[t for _, t in sorted(model.state_dict().items())])


def _tmp(path: Path) -> Path:
    """A temporary name next to ``path``, private to this process (several ranks may write the same
    file, e.g. a store's identical manifest, at once)."""
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def _fsync_folder(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (POSIX: fsync the directory; elsewhere a no-op)."""
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic(path, write: Callable) -> Path:
    """Write ``path`` through ``write(binary file)`` atomically and durably: into a temporary file beside it,
    flushed and fsync'ed, renamed over ``path``, then the folder fsync'ed — after a crash or power loss the
    file is either the old one or the whole new one, never torn or empty. Parent folders are created; an
    unwritable folder is a DNTKError naming it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_dir():
            raise DNTKError(f"{path} is a folder; dntk needs to write a file there — move the folder away")
        tmp = _tmp(path)
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
        except BaseException:   # interrupted or failed: no half file under either name
            tmp.unlink(missing_ok=True)
            raise
    except (PermissionError, NotADirectoryError, IsADirectoryError, FileExistsError) as e:
        raise DNTKError(f"cannot write {path}: {e.strerror or e}; choose an output folder you can write "
                        "(--out)") from None
    _fsync_folder(path.parent)
    return path


def atomic_save(obj, path) -> Path:
    """torch.save ``obj`` to ``path`` atomically and durably (:func:`_atomic`)."""
    return _atomic(path, lambda f: torch.save(obj, f))


def _json_default(value):
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return float(value)  # numpy / torch scalars


def atomic_json(obj, path, indent: int = 2) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically and durably (paths become strings, numeric scalars floats)."""
    text = json.dumps(obj, indent=indent, default=_json_default)
    return _atomic(path, lambda f: f.write(text.encode()))


def atomic_write_text(text: str, path) -> Path:
    """Write ``text`` to ``path`` atomically and durably (parent folders created)."""
    return _atomic(path, lambda f: f.write(text.encode()))


def load(path, *, trusted: bool = True):
    """torch.load on CPU; ``trusted`` files (written by dntk itself) may hold Python objects."""
    return torch.load(path, map_location="cpu", weights_only=not trusted)


def _unreadable(path: Path, error: Exception, what: str) -> None:
    warnings.warn(f"{path} is unreadable ({'empty' if path.stat().st_size == 0 else type(error).__name__}: an "
                  f"interrupted write or a damaged disk?); {what}", RuntimeWarning, stacklevel=3)


def load_or_none(path, *, trusted: bool = True, what: str = "treating it as missing"):
    """The object dntk saved at ``path`` (:func:`load`); None when the file is missing, or — with a
    RuntimeWarning naming it — empty or torn (never a raw EOFError / unpickling error)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return load(path, trusted=trusted)
    except Exception as e:   # torch.load raises EOFError, RuntimeError, UnpicklingError, zipfile errors, ...
        _unreadable(path, e, what)
        return None


def read_json(path, *, what: str = "treating it as missing"):
    """The JSON value dntk wrote at ``path``; None when missing, or — with a RuntimeWarning naming it —
    empty or torn."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        _unreadable(path, e, what)
        return None


def cached(path, compute: Callable[[], object]):
    """The object saved at ``path``, or ``compute()`` saved there atomically first. A torn or empty file
    there is recomputed (with a warning), never a traceback."""
    path = Path(path)
    value = load_or_none(path, what="recomputing it")
    if value is not None:
        return value
    value = compute()
    atomic_save(value, path)
    return value


# --- the sharded, memory-mapped feature store ------------------------------------------------------------
STORE_FORMAT = "dntk-feature-store-1"


def _sha1_file(path: Path) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class FeatureStore:
    """Projected features on disk: fixed-size shards of memory-mapped ``.npy`` arrays and a manifest.

    Layout of ``folder``::

        manifest.json                 identity (model checksum, projector name/k/seed/map, inputs digest),
                                      n, shard size and the shards' index ranges
        shard-000003.features.npy     float32 [C, stop − start, k]   (numpy .npy, opened as a memmap)
        shard-000003.logits.npy       float32 [stop − start, C]
        shard-000003.labels.npy       int64 [stop − start]           (when the inputs carried labels)
        shard-000003.json             completion record: range, SHA-1 of each array file, engine paths

    A shard is written array by array to temporary names and renamed; its ``.json`` record is written
    last (atomically), so a shard is complete exactly when its record exists. An interrupted
    extraction resumes at the missing shards; several processes (``rank``/``world``) each write their
    own shards. Reading a class's [n, k] block or an index range opens only the shards it needs.

    Shard boundaries depend only on the shard size, never on the number of processes, so every shard
    is computed with the same batches whoever computes it.
    """

    def __init__(self, folder, shard: int = 1024):
        require_int(shard, "shard", 1, "choose how many samples one shard holds")
        self.folder, self.shard = Path(folder), shard
        self._manifest = None
        self._verified: set = set()

    # -- layout --------------------------------------------------------------------------------------
    def ranges(self, n: int) -> list[tuple[int, int]]:
        return [(s, min(n, s + self.shard)) for s in range(0, n, self.shard)]

    def _path(self, i: int, what: str) -> Path:
        return self.folder / f"shard-{i:06d}.{what}"

    @property
    def manifest(self) -> dict:
        if self._manifest is None:
            path = self.folder / "manifest.json"
            if not path.exists():
                raise DNTKError(f"no feature store at {self.folder} (manifest.json missing); extract features first")
            try:
                manifest = json.loads(path.read_text())
            except ValueError:
                manifest = None
            keys = ("format", "identity", "n", "shard_size", "shards")
            if not isinstance(manifest, dict) or manifest.get("format") != STORE_FORMAT or any(k not in manifest for k in keys):
                raise DNTKError(f"{path} is not a dntk feature-store manifest ({STORE_FORMAT}); point at a "
                                "features-... folder that dntk wrote")
            self._manifest = manifest
            self.shard = manifest["shard_size"]
        return self._manifest

    def _open(self, identity: dict, n: int) -> dict:
        """Write the manifest, or check that the one present describes the same extraction."""
        path = self.folder / "manifest.json"
        wanted = {"format": STORE_FORMAT, "identity": identity, "n": n, "shard_size": self.shard,
                  "shards": self.ranges(n)}
        have = read_json(path, what="writing it again") if path.exists() else None
        if have is not None and not isinstance(have, dict):
            warnings.warn(f"{path} is not a feature-store manifest; writing it again", RuntimeWarning, stacklevel=3)
            have = None
        if have is not None and have.get("shards") != [list(r) for r in wanted["shards"]] and all(
                have.get(k) == wanted[k] for k in ("format", "identity", "n", "shard_size")):
            # an edited or damaged range list: the ranges follow from n and the shard size, so write them again
            # (completion records name their own range; a shard whose range differs is recomputed)
            warnings.warn(f"{path} lists shard ranges that do not follow from n = {n} and shard size {self.shard}; "
                          "writing them again", RuntimeWarning, stacklevel=3)
            have = None
        if have is not None:
            keys = ("format", "identity", "n", "shard_size")
            if {k: have.get(k) for k in keys} != {k: wanted[k] for k in keys}:
                diff = [k for k in keys if have.get(k) != wanted[k]]
                raise DNTKError(f"{self.folder} holds another extraction (its {', '.join(diff)} differ); "
                                "use another folder or delete this one")
            self._manifest = have
            return have
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_json(wanted, path)
        self._manifest = wanted
        return wanted

    def _record(self, i: int) -> dict | None:
        """Shard i's completion record if it belongs to this manifest's extraction and range, else None."""
        path = self._path(i, "json")
        if not path.exists():
            return None
        try:
            rec = json.loads(path.read_text())
        except ValueError:
            return None
        m = self.manifest
        start, stop = m["shards"][i]
        if rec.get("identity") != digest(m["identity"]) or (rec.get("index"), rec.get("start"), rec.get("stop")) != \
                (i, start, stop):
            return None
        return rec

    def _arrays_ok(self, i: int, rec: dict) -> bool:
        """Every array the record lists is present with the recorded shape and dtype (a torn or
        foreign file fails: the .npy header and the file size are checked, not the contents)."""
        for what, (shape, dtype) in rec.get("arrays", {}).items():
            try:
                a = self._array(i, what)
            except (ValueError, OSError, EOFError):
                return False
            if list(a.shape) != shape or str(a.dtype) != dtype:
                return False
        return bool(rec.get("arrays"))

    def _sums_ok(self, i: int, rec: dict) -> bool:
        """Every array's bytes have the SHA-1 its record states (a flipped, swapped or foreign file fails).
        Checked once per file version (path, size, mtime_ns) per store object — files this object wrote
        itself are known good and never hashed again. Cost measured: SHA-1 of a 100 MB shard file takes
        0.07 s (≈ 1.4 GB/s, one core of the project's 2-core machine, file in the page cache; the disk's
        read speed bounds it when it is not), a fraction of what computing the features cost."""
        for what, sha in rec.get("sha1", {}).items():
            path = self._path(i, f"{what}.npy")
            try:
                st = path.stat()
            except OSError:
                return False
            key = (str(path), st.st_size, st.st_mtime_ns, sha)
            if key in self._verified:
                continue
            if _sha1_file(path) != sha:
                return False
            self._verified.add(key)
        return True

    def complete(self, i: int) -> bool:
        """Shard i has a record of this extraction and range, its arrays are whole and their checksums
        match the record."""
        rec = self._record(i)
        return rec is not None and self._arrays_ok(i, rec) and self._sums_ok(i, rec)

    def _bad_file(self, i: int, rec: dict) -> str:
        """Which file of a recorded shard i fails (for the message), as 'name: reason'."""
        for what, (shape, dtype) in rec.get("arrays", {}).items():
            path = self._path(i, f"{what}.npy")
            try:
                a = self._array(i, what)
            except (ValueError, OSError, EOFError):
                return f"{path.name}: missing or unreadable"
            if list(a.shape) != shape or str(a.dtype) != dtype:
                return f"{path.name}: shape {list(a.shape)} {a.dtype}, recorded {shape} {dtype}"
        for what, sha in rec.get("sha1", {}).items():
            path = self._path(i, f"{what}.npy")
            if _sha1_file(path) != sha:
                return f"{path.name}: SHA-1 differs from the one {self._path(i, 'json').name} records"
        return f"{self._path(i, 'json').name}: lists no arrays"

    def missing(self, n: int | None = None) -> list[int]:
        """Indices of the shards that are not complete (no record of this extraction, or arrays torn or
        differing from their recorded checksums)."""
        count = len(self.ranges(n)) if n is not None else len(self.manifest["shards"])
        return [i for i in range(count) if not self.complete(i)]

    # -- writing -------------------------------------------------------------------------------------
    def _write_shard(self, i: int, start: int, stop: int, result, rank: int = 0, seconds: float | None = None,
                     computed_with: dict | None = None) -> None:
        files = {"features": result.features.float().numpy(), "logits": result.logits.float().numpy()}
        if result.labels is not None:
            files["labels"] = result.labels.long().numpy()
        sums, arrays = {}, {}
        for what, array in files.items():
            path = self._path(i, f"{what}.npy")
            tmp = _tmp(path)
            with open(tmp, "wb") as f:
                np.save(f, array)
                f.flush()
                os.fsync(f.fileno())   # durable before its record names it (a power loss leaves no empty shard behind one)
            sums[what] = _sha1_file(tmp)  # the bytes this process wrote, before anyone can replace them
            tmp.replace(path)
            st = path.stat()   # this version is known good: not hashed again when the run reads it back
            self._verified.add((str(path), st.st_size, st.st_mtime_ns, sums[what]))
            arrays[what] = [list(array.shape), str(array.dtype)]
        atomic_json({"index": i, "start": start, "stop": stop, "identity": digest(self.manifest["identity"]),
                     "rank": rank, "sha1": sums, "arrays": arrays, "classes": list(result.classes),
                     "paths": result.paths, "num_params": result.num_params, "seconds": seconds,
                     "computed_with": computed_with},
                    self._path(i, "json"))

    def extract(self, model, X, projector, *, identity: dict | None = None, batch_size: int = 32,
                device=None, progress: bool = True, rank: int = 0, world: int = 1) -> list[int]:
        """Compute the missing shards of :func:`dntk.gradient_features` of X that belong to ``rank``
        (shard i goes to rank i mod world). X: n samples as a tensor [n, ...], a tuple or a dict of
        tensors (:mod:`dntk.samples`). ``identity``: what the features depend on besides the
        inputs (model checksum, projector) — default: the projector's name, k and seed and a digest of
        the model's state; the inputs' digest is always added. Returns the shards computed here."""
        from . import samples
        from .features import gradient_features

        n = samples.count(X)
        if n == 0:
            raise DNTKError("no inputs to extract features from")
        if identity is None:
            identity = {"model": model_checksum(model)}
        identity = {**identity, "projector": {"name": projector.name, "k": projector.k, "seed": projector.seed,
                                         "map": repr(projector)},
                    "inputs": digest(X)}
        from .lock import hold

        from concurrent.futures import ThreadPoolExecutor

        with hold(self.folder, rank=rank):   # a second extraction into this folder at once is refused, naming us
            self._open(identity, n)
            done = []
            # what the numbers depend on at float rounding, not in value: recorded per shard, so a store resumed
            # at another thread count or device says so (computed_with)
            from .features.extract import model_device
            dev = torch.device(device) if device is not None else model_device(model)
            with_ = {"threads": torch.get_num_threads(), "device": dev.type, "world": world}
            # each shard is written (saved, hashed, recorded) by a writer thread while the next one is computed;
            # one write at a time, its error raised before the next write starts or at the end; an interrupted
            # write leaves no completion record, so that shard is recomputed on resume
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="dntk-shard-writer") as writer:
                pending = None
                for i, (start, stop) in enumerate(self.ranges(n)):
                    if i % world != rank or self.complete(i):
                        continue
                    if self._record(i) is not None:   # recorded but torn or altered on disk: never used, recomputed
                        warnings.warn(f"{self.folder}: shard {i} does not match its completion record (a changed, "
                                      "truncated or swapped file); recomputing it", RuntimeWarning, stacklevel=2)
                    t0 = time.perf_counter()
                    result = gradient_features(model, samples.take(X, slice(start, stop)), projector,
                                               batch_size=batch_size, device=device, progress=progress)
                    if pending is not None:
                        pending.result()
                    pending = writer.submit(self._write_shard, i, start, stop, result, rank,
                                            seconds=time.perf_counter() - t0, computed_with=with_)
                    done.append(i)
                if pending is not None:
                    pending.result()
        return done

    # -- reading -------------------------------------------------------------------------------------
    def _require_complete(self, shards=None):
        """Every shard in ``shards`` (default all) is recorded, whole and of its recorded SHA-1 (hashed the
        first time this store object reads it, see :meth:`_sums_ok`); else a DNTKError naming the bad
        files and the fix."""
        idx = range(len(self.manifest["shards"])) if shards is None else shards
        missing = [i for i in idx if not self.complete(i)]
        if missing:
            named = []
            for i in missing[:3]:
                rec = self._record(i)
                named.append(f"shard {i}: no completion record {self._path(i, 'json').name}" if rec is None else
                             f"shard {i}: {self._bad_file(i, rec)}")
            raise DNTKError(f"{self.folder}: shards {missing[:10]}{' …' if len(missing) > 10 else ''} of "
                            f"{len(self.manifest['shards'])} are missing or do not match their checksums "
                            f"({'; '.join(named)}); rerun the extraction to (re)compute them, or delete those shards' "
                            "files (shard-NNNNNN.*) to drop them")

    def _array(self, i: int, what: str):
        return np.load(self._path(i, f"{what}.npy"), mmap_mode="r")

    def _shards_over(self, start: int, stop: int):
        for i, (s, e) in enumerate(self.manifest["shards"]):
            if e > start and s < stop:
                yield i, s, e

    def _range(self, start, stop, where: str) -> tuple[int, int, list]:
        """Checked [start, stop) with 0 ≤ start < stop ≤ n (no negative or Python-style indices, no empty
        or past-the-end range), and the overlapping shards, verified."""
        n = self.manifest["n"]
        start = V.count(start, "start", f"pass a sample index 0..{n - 1}", minimum=0, where=where)
        stop = n if stop is None else V.count(stop, "stop", f"pass an end index 1..{n}, or None for the end",
                                              minimum=0, where=where)
        if not start < stop <= n:
            raise DNTKError(f"{where}: [start={start}, stop={stop}) is not a non-empty range of the store's {n} samples; "
                            f"pass 0 ≤ start < stop ≤ {n}")
        over = list(self._shards_over(start, stop))
        self._require_complete([i for i, _, _ in over])
        return start, stop, over

    def _classes_count(self, i: int) -> int:
        return self._record(i)["arrays"]["features"][0][0]

    def read_class(self, c: int, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Features of logit position c for samples [start, stop): float32 [stop − start, k]; only the
        shards overlapping the range are opened (and verified, see :meth:`read`), and only class c's rows
        of them are read. 0 ≤ c < C, 0 ≤ start < stop ≤ n."""
        start, stop, over = self._range(start, stop, "read_class")
        C = self._classes_count(over[0][0])
        c = V.count(c, "c", f"pass a logit position 0..{C - 1}", minimum=0, where="read_class")
        if c >= C:
            raise DNTKError(f"read_class: c={c} is out of range for a store of C={C} logit positions; use 0..{C - 1}")
        parts = [np.asarray(self._array(i, "features")[c, max(start, s) - s:min(stop, e) - s]) for i, s, e in over]
        return torch.from_numpy(np.concatenate(parts))

    def read(self, start: int = 0, stop: int | None = None, projector=None):
        """Samples [start, stop) (0 ≤ start < stop ≤ n; stop None = n) as a
        :class:`~dntk.features.FeatureResult` (features [C, len, k], logits [len, C], labels [len]).

        Only the shards overlapping the range are opened; each is verified against its completion
        record — present, whole and of its recorded SHA-1 (hashed once per file version and store object:
        0.07 s per 100 MB, see :meth:`_sums_ok`) — and a bad one is a DNTKError naming its file and the fix.
        ``projector``: attached to the result; it must be the manifest's (same name, k and seed), else refused."""
        from .features import FeatureResult

        if projector is not None:
            self._check_projector(projector)
        start, stop, over = self._range(start, stop, "read")
        feats, logits, labels, record = [], [], [], None
        for i, s, e in over:
            a, b = max(start, s) - s, min(stop, e) - s
            feats.append(np.asarray(self._array(i, "features")[:, a:b]))
            logits.append(np.asarray(self._array(i, "logits")[a:b]))
            rec = self._record(i)
            if "labels" in rec["arrays"]:
                labels.append(np.asarray(self._array(i, "labels")[a:b]))
            record = record or rec
        lab = torch.from_numpy(np.concatenate(labels)) if len(labels) == len(feats) and labels else None
        return FeatureResult(torch.from_numpy(np.concatenate(feats, 1)), torch.from_numpy(np.concatenate(logits)), lab,
                             record["classes"], projector, record["paths"], record["num_params"])

    def _check_projector(self, projector) -> None:
        have = self.manifest["identity"].get("projector", {})
        given = {"name": getattr(projector, "name", None), "k": getattr(projector, "k", None),
                 "seed": getattr(projector, "seed", None)}
        diff = [f"{key} {given[key]!r} vs {have.get(key)!r}" for key in ("name", "k", "seed") if given[key] != have.get(key)]
        if diff:
            raise DNTKError(f"read: the projector passed differs from the one these features were made with "
                            f"({', '.join(diff)}: given vs manifest); pass dntk.projection.make({have.get('name')!r}, "
                            f"k={have.get('k')!r}, seed={have.get('seed')!r}) or projector=None")

    def read_logits(self, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """The model's outputs float32 [stop − start, C] (no features are read; 0 ≤ start < stop ≤ n)."""
        start, stop, over = self._range(start, stop, "read_logits")
        return torch.from_numpy(np.concatenate([np.asarray(self._array(i, "logits")[max(start, s) - s:min(stop, e) - s])
                                                for i, s, e in over]))

    def computed_with(self) -> dict:
        """{"threads": [...], "device": [...], "world": [...]}: the distinct settings the completed shards were
        computed with (sorted; empty lists for shards recorded before this was kept). Features are bit-identical
        only within one setting; across thread counts or devices they agree to float rounding (see the docs'
        *Reproducibility*), so a store resumed under another setting holds a mix."""
        out = {"threads": set(), "device": set(), "world": set()}
        for i in range(len(self.manifest["shards"])):
            rec = self._record(i)
            w = (rec or {}).get("computed_with") or {}
            for key in out:
                if key in w:
                    out[key].add(w[key])
        return {key: sorted(v, key=str) for key, v in out.items()}

    def extraction_seconds(self) -> float | None:
        """Wall seconds the shards took to compute, summed over shards (whichever invocation or rank computed
        them); None when a shard was written without its time (by an older dntk)."""
        total = 0.0
        for i in range(len(self.manifest["shards"])):
            rec = self._record(i)
            if rec is None or rec.get("seconds") is None:
                return None
            total += rec["seconds"]
        return total

    def path_shares(self) -> dict:
        """The engine path shares of the first shard's parameters (see FeatureResult.path_shares)."""
        from .features import FeatureResult

        self._require_complete()
        rec = self._record(0)
        return FeatureResult(torch.empty(0), torch.empty(0), None, rec["classes"], None, rec["paths"],
                             rec["num_params"]).path_shares()

    def verify(self, checksums: bool = True) -> dict:
        """{"complete": bool, "missing": [shard indices], "corrupt": [(index, file, reason)], "n", "shards"}.
        A shard without a record of this extraction and range is missing; one whose arrays are absent,
        torn, of another shape or dtype than recorded, inconsistent with the other shards (C, k) or
        (``checksums``) of another SHA-1 than recorded is corrupt."""
        m = self.manifest
        corrupt, missing, dims = [], [], set()
        for i, (s, e) in enumerate(m["shards"]):
            rec = self._record(i)
            if rec is None:
                missing.append(i)
                continue
            for what, sha in rec.get("sha1", {}).items():
                path = self._path(i, f"{what}.npy")
                if not path.exists():
                    corrupt.append((i, path.name, "missing"))
                    continue
                try:
                    a = self._array(i, what)
                except (ValueError, OSError, EOFError) as err:
                    corrupt.append((i, path.name, f"unreadable ({err})"))
                    continue
                expected = {"features": (np.float32, 3, 1), "logits": (np.float32, 2, 0), "labels": (np.int64, 1, 0)}
                dtype, ndim, axis = expected.get(what, (None, a.ndim, 0))
                if (dtype is not None and a.dtype != dtype) or a.ndim != ndim or a.shape[axis] != e - s:
                    corrupt.append((i, path.name, f"shape {tuple(a.shape)} {a.dtype}, expected {e - s} rows of "
                                                  f"{np.dtype(dtype).name if dtype else a.dtype}"))
                elif what == "features":
                    dims.add((a.shape[0], a.shape[2]))
                if checksums and _sha1_file(path) != sha and (i, path.name) not in [(c[0], c[1]) for c in corrupt]:
                    corrupt.append((i, path.name, "checksum differs"))
        if len(dims) > 1:
            corrupt.append((-1, "features", f"shards disagree on (C, k): {sorted(dims)}"))
        return {"complete": not missing and not corrupt, "missing": missing, "corrupt": corrupt, "n": m["n"],
                "shards": len(m["shards"])}
