"""Every benchmark table in README.md and docs/*.md, rendered from its JSON in benchmarks/results/.

Usage:  python3 benchmarks/render.py            # rewrite every block between its <!-- name --> markers
        python3 benchmarks/render.py --check    # exit 1 and name the blocks that differ (what the test does)

Each benchmark owns its ``render(json) -> str | tuple[str, ...]``; :data:`BLOCKS` maps the blocks to
them. tests/test_readme_tables.py fails when a checked-in block differs from its rendering, so a number
on a page cannot drift from the measurement it reports."""

from __future__ import annotations

import argparse
import functools
import importlib
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, block_files, write_readme_block  # noqa: E402

# (benchmark module, its JSON, the blocks render returns in order, what render takes from the JSON[, the module's
# render function when it is not ``render``)
BLOCKS = [
    ("bench_gradients", "gradients.json", ["gradients-tables"], lambda d: d),
    ("bench_select", "select.json", ["select-table", "gap-table"], lambda d: d),
    ("bench_own_models", "own_models.json", ["own-models-table"], lambda d: d["rows"]),
    ("bench_students", "students.json", ["students-table"], lambda d: d),
    ("bench_zoo", "zoo.json", ["zoo-table", "zoo-summary", "zoo-headline"],
     lambda d: (d, json.loads((RESULTS / "zoo_1thread.json").read_text()) if (RESULTS / "zoo_1thread.json").exists()
                else None)),
    ("bench_features", "features.json", ["features-table", "projectors-table"], lambda d: d),
    ("bench_scale", "scale.json", ["scale-tables"], lambda d: d),
    ("bench_distill", "distill.json", ["distill-table"], lambda d: d),
    ("analyze_distill", "distill_analysis.json", ["distill-analysis-table"], lambda d: d),
    ("bench_train", "train_steps.json", ["train-steps"], lambda d: d),
    ("gpu_suite", "gpu_pack.json", ["gpu-plan"], lambda d: d),
    ("reproduce_docs", "reproduce-cpu64/reproduce.json", ["reproduce-table"], lambda d: d),
    ("digits", "digits.json", ["digits-output"], lambda d: d),
    ("bench_zoo", "zoo_n64.json", ["zoo-n64"], lambda d: d, "render_longer"),
]

# marked blocks that are not benchmark numbers, and what keeps them true instead
NOT_RENDERED = {"results-schema": "the results.json fields, by hand; tests/test_structure.py checks them against RunResult"}


@functools.lru_cache(maxsize=1)
def rendered() -> dict[str, str]:
    """{block name: its body rendered from the JSON} for every block whose JSON exists (computed once per
    process: the GPU plan's FLOP counts take seconds)."""
    out = {}
    for module, name, blocks, arg, *function in BLOCKS:
        path = RESULTS / name
        if not path.exists():
            continue
        res = getattr(importlib.import_module(module), function[0] if function else "render")(arg(json.loads(path.read_text())))
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


def marked() -> set[str]:
    """The name of every ``<!-- name -->`` … ``<!-- /name -->`` block on the pages."""
    import re
    names = set()
    for page in block_files():
        text = page.read_text()
        names |= {n for n in re.findall(r"<!-- ([\w-]+) -->", text) if f"<!-- /{n} -->" in text}
    return names


def differing() -> list[str]:
    """The blocks whose checked-in text differs from the rendering, that no page holds, or that a page marks
    but nothing renders (a hand-filled table)."""
    bad = []
    done = rendered()
    bad += [f"{name}: marked on a page but rendered by nothing in BLOCKS" for name in sorted(marked() - set(done) - set(NOT_RENDERED))]
    for name, body in done.items():
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
