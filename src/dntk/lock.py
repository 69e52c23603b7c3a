"""One lock per output folder: two jobs writing one ``--out`` at once would mix their results.

:func:`hold` takes an exclusive ``fcntl.flock`` on ``OUT/.dntk.lock`` for as long as the job runs and
writes the holder's PID and command line into it. A second job on the same folder is refused at once,
naming that PID and command. The kernel drops the lock when its process dies, so the lock of a killed
job is taken over by the next one — no stale lock to delete by hand. The lock is re-entrant within a
thread (``dntk reproduce`` runs ``dntk run`` twice in its folder) — another thread of the same process is
refused like another process — and under torchrun only rank 0 takes it: the ranks of one job are one
writer (each writes its own shards).
"""

from __future__ import annotations

import os
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

from .errors import DNTKError

LOCK_NAME = ".dntk.lock"
_held: dict[str, list] = {}   # resolved folder → [file object, depth]
_threads: dict[str, threading.RLock] = {}   # resolved folder → the lock of the thread holding it
_guard = threading.Lock()


@contextmanager
def hold(folder, *, rank: int = 0):
    """Hold the folder's lock for the body (rank ≠ 0: nothing is taken)."""
    if rank != 0 or os.name != "posix":
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = str(folder.resolve())
    with _guard:
        thread_lock = _threads.setdefault(key, threading.RLock())
    if not thread_lock.acquire(blocking=False):
        raise DNTKError(f"{folder} is in use by another thread of this process; one job per --out at a time")
    try:
        if key in _held:   # re-entered by the thread that holds it
            _held[key][1] += 1
            try:
                yield
            finally:
                _held[key][1] -= 1
            return
        with _flock(folder, key):
            yield
    finally:
        thread_lock.release()


@contextmanager
def _flock(folder: Path, key: str):
    import fcntl

    path = folder / LOCK_NAME
    f = open(path, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.seek(0)
        holder = f.read().strip() or "an unknown process"
        f.close()
        raise DNTKError(f"{folder} is in use by another dntk job ({holder}); wait for it to finish, or use another "
                        "--out — two jobs in one folder would mix their results") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}: {' '.join(sys.argv)}\n")
    f.flush()
    _held[key] = [f, 1]
    try:
        yield
    finally:
        _held[key][1] -= 1
        if _held[key][1] == 0:
            del _held[key]
            f.close()   # releases the flock
