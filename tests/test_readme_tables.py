"""The README's benchmark tables are exactly what each benchmark's ``render`` makes of its JSON in
benchmarks/results/ (``python3 benchmarks/<bench>.py --render`` writes them between the markers), so
a number in the README can't drift from the measurement it reports."""
import importlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _block(text: str, name: str) -> str:
    a, b = f"<!-- {name} -->", f"<!-- /{name} -->"
    assert a in text and b in text, f"README lost its {a} markers"
    return text[text.index(a) + len(a):text.index(b)]


def _render(module: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(module).render
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


# (benchmark module, its JSON, README blocks in the order render returns them, what render takes)
CASES = [
    ("bench_gradients", "gradients.json", ["gradients-tables"], lambda d: d),
    ("bench_select", "select.json", ["select-table", "gap-table"], lambda d: d),
    ("bench_own_models", "own_models.json", ["own-models-table"], lambda d: d["rows"]),
]


@pytest.mark.parametrize("module,json_name,blocks,arg", CASES, ids=[c[0] for c in CASES])
def test_readme_tables_are_rendered_from_the_benchmark_json(module, json_name, blocks, arg):
    data = ROOT / "benchmarks" / "results" / json_name
    if not data.exists():
        pytest.skip(f"benchmarks/results/{json_name} has not been written")
    out = _render(module)(arg(json.loads(data.read_text())))
    out = out if isinstance(out, tuple) else (out,)
    text = (ROOT / "README.md").read_text()
    assert len(out) == len(blocks)
    for name, body in zip(blocks, out):
        # the blank lines at the markers' edges aside, byte for byte
        assert _block(text, name).strip("\n") == body.strip("\n"), f"README block {name} differs from {module}'s render"
