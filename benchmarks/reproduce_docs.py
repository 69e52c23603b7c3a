"""The benchmarks page's digest of `dntk reproduce --setting cpu64` (block ``reproduce-table``), rendered by
benchmarks/render.py from the checked-in report folder: ``reproduce-cpu64/reproduce.json`` and, when present,
the 160 px probe ``reproduce-paper160-probe/probe-paper160.json``. The formatting is the library's
(:func:`dntk.report.reproduce_report.docs_summary`)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402

from dntk.report.reproduce_report import docs_summary  # noqa: E402

PROBE = RESULTS / "reproduce-paper160-probe" / "probe-paper160.json"


def render(summary: dict) -> str:
    probe = json.loads(PROBE.read_text()) if PROBE.exists() else None
    return docs_summary(summary, probe)


if __name__ == "__main__":
    print(render(json.loads((RESULTS / "reproduce-cpu64" / "reproduce.json").read_text())))
