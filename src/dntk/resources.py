"""What a stage cost: wall-clock seconds per named stage and peak resident memory."""

from __future__ import annotations

import resource
import time
from contextlib import contextmanager


def reset_peak_rss() -> None:
    """Start a new peak-RSS window (Linux: VmHWM is reset through /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    """Peak resident memory (MB) since the last reset_peak_rss() (Linux), else of the process."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return process_peak_rss_mb()


def process_peak_rss_mb() -> float:
    """Peak resident memory (MB) of the whole process so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StageTimer:
    """Wall-clock seconds per named stage (a stage entered twice accumulates): ``with t.time("x"):``."""

    def __init__(self):
        self.timings: dict[str, float] = {}

    @contextmanager
    def time(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t
