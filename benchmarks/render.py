"""Every benchmark table in README.md and docs/*.md, rendered from its JSON in benchmarks/results/.

Usage:  python3 benchmarks/render.py            # rewrite every block between its <!-- name --> markers
        python3 benchmarks/render.py --check    # exit 1 and name the blocks that differ (what the test does)

Each benchmark owns its ``render(json) -> str | tuple[str, ...]``; :data:`BLOCKS` maps the blocks to
them. tests/test_readme_tables.py fails when a checked-in block differs from its rendering, so a number
on a page cannot drift from the measurement it reports."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, block_files, write_readme_block  # noqa: E402

# (benchmark module, its JSON, the blocks render returns in order, what render takes from the JSON)
BLOCKS = [
    ("bench_gradients", "gradients.json", ["gradients-tables"], lambda d: d),
    ("bench_select", "select.json", ["select-table", "gap-table"], lambda d: d),
    ("bench_own_models", "own_models.json", ["own-models-table"], lambda d: d["rows"]),
    ("bench_students", "students.json", ["students-table"], lambda d: d),
    ("bench_zoo", "zoo.json", ["zoo-table"], lambda d: d),
    ("digits", "digits.json", ["digits-output"], lambda d: d),
]


def rendered() -> dict[str, str]:
    """{block name: its body rendered from the JSON} for every block whose JSON exists."""
    out = {}
    for module, name, blocks, arg in BLOCKS:
        path = RESULTS / name
        if not path.exists():
            continue
        res = importlib.import_module(module).render(arg(json.loads(path.read_text())))
        res = res if isinstance(res, tuple) else (res,)
        if len(res) != len(blocks):
            raise SystemExit(f"{module}.render returned {len(res)} blocks, expected {blocks}")
        out.update(zip(blocks, res))
    return out


def checked_in(name: str) -> list[tuple[Path, str]]:
    """[(page, body)] of every page holding block ``name``."""
    a, b = f"<!-- {name} -->", f"<!-- /{name} -->"
    found = []
    for page in block_files():
        text = page.read_text()
        if a in text and b in text:
            found.append((page, text[text.index(a) + len(a):text.index(b)]))
    return found


def differing() -> list[str]:
    """The blocks whose checked-in text differs from the rendering (or that no page holds)."""
    bad = []
    for name, body in rendered().items():
        pages = checked_in(name)
        if not pages:
            bad.append(f"{name}: no page has its markers")
        bad += [f"{name} in {page.name}" for page, text in pages if text.strip("\n") != body.strip("\n")]
    return bad


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 when a block differs")
    args = ap.parse_args()
    if args.check:
        bad = differing()
        print("\n".join(bad) if bad else "every block matches its rendering")
        raise SystemExit(1 if bad else 0)
    for name, body in rendered().items():
        print(f"{name}: {'written' if write_readme_block(name, body) else 'no page has its markers'}")


if __name__ == "__main__":
    main()
