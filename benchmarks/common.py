"""Helpers shared by the benchmark scripts: peak-memory probes, real image batches, JSON output."""

from __future__ import annotations

import ctypes
import gc
import json
import os
import platform
import time
from contextlib import contextmanager
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
# the shared data folder: DNTK_DATA, as for the tests (default ../shared/data beside the repository)
SHARED = Path(os.environ.get("DNTK_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


@contextmanager
def peak_memory():
    """Measures the rise of peak RSS (MiB) over the RSS at entry; Linux only (VmHWM reset via
    /proc/self/clear_refs). Yields a dict filled with ``peak_mb`` on exit."""
    box = {"peak_mb": float("nan")}
    gc.collect()
    try:  # hand freed heap pages back to the OS, or reuse of them would hide the peak
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kb("VmRSS")
    except OSError:
        base = None
    try:
        yield box
    finally:
        if base is not None:
            box["peak_mb"] = (_status_kb("VmHWM") - base) / 1024


@contextmanager
def timer():
    box = {}
    t = time.perf_counter()
    yield box
    box["s"] = time.perf_counter() - t


def real_images(n: int, size: int, seed: int = 0, root=None) -> torch.Tensor:
    """n ImageNette sample photos (evenly over classes) of root's val split (default: the shared
    sample), resized to size×size, ImageNet-normalised; falls back to Gaussian noise when the data is
    absent."""
    from dntk.data import balanced_indices, image_folder

    root = Path(root) if root is not None else SHARED / "imagenette2-224-sample"
    if not root.exists():
        print(f"[warn] {root} not found: using noise images")
        return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))
    ds = image_folder(root, "val", image_size=size)
    return ds.tensors(balanced_indices(ds.labels, n, ds.num_classes))[0]


def machine() -> dict:
    return {"cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(), "cores": os.cpu_count()}


def write_json(name: str, payload: dict) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)
    return path


def table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """Format rows as a Markdown table; columns are (key, header, format)."""
    head = "| " + " | ".join(h for _, h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for key, _, fmt in columns:
            v = r.get(key)
            cells.append("–" if v is None or (isinstance(v, float) and v != v) else (fmt.format(v) if fmt else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def block_files() -> list[Path]:
    """The pages that hold rendered benchmark blocks: README.md and docs/*.md."""
    root = Path(__file__).resolve().parents[1]
    return [root / "README.md", *sorted((root / "docs").glob("*.md"))]


def write_readme_block(name: str, body: str) -> bool:
    """Replace what lies between the ``<!-- name -->`` and ``<!-- /name -->`` markers with ``body`` (the
    benchmark tables rendered from their JSON), in every page that has them (README.md, docs/*.md).
    False when no page has the markers."""
    a, b = f"<!-- {name} -->", f"<!-- /{name} -->"
    found = False
    for page in block_files():
        text = page.read_text()
        if a not in text or b not in text:
            continue
        page.write_text(text[:text.index(a) + len(a)] + "\n" + body + "\n" + text[text.index(b):])
        found = True
    return found
