"""The README's digits example: ``dntk run --exact --threads 2`` on the embedded default, its
results.json kept as benchmarks/results/digits.json, and the console table rendered from it between
the README's <!-- digits-output --> markers (so the numbers on the front page are a run's, not typed).

Usage:  python3 benchmarks/digits.py            # run it (~30 s on 2 cores), write the JSON and the README block
        python3 benchmarks/digits.py --render   # only re-render the README block from the JSON
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, write_readme_block  # noqa: E402

COMMAND = ["run", "--exact", "--threads", "2"]


def render(d: dict) -> str:
    """The console table of the run (:func:`dntk.report.format_results`), without its timings line."""
    from dntk.pipeline import RunResult
    from dntk.report import format_results

    lines = format_results(RunResult(**d)).strip("\n").split("\n")
    lines = [line for line in lines if not line.startswith("timings (s)")]
    return "```\n$ dntk " + " ".join(COMMAND) + "\n" + "\n".join(lines) + "\n```"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--render", action="store_true", help="only re-render the README block from digits.json")
    args = ap.parse_args()
    path = RESULTS / "digits.json"
    if not args.render:
        with tempfile.TemporaryDirectory() as out:
            subprocess.run([sys.executable, "-m", "dntk", *COMMAND, "--out", out, "--quiet"], check=True)
            shutil.copyfile(Path(out) / "results.json", path)
    print(render(json.loads(path.read_text())))
    print("README updated" if write_readme_block("digits-output", render(json.loads(path.read_text())))
          else "README has no <!-- digits-output --> markers")


if __name__ == "__main__":
    main()
