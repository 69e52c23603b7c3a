"""The benchmark tables in README.md and docs/*.md are exactly what each benchmark's ``render`` makes of
its JSON in benchmarks/results/ (``python3 benchmarks/render.py`` writes them between the markers), so
a number on a page can't drift from the measurement it reports."""
import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
render = importlib.import_module("render")
sys.path.remove(str(ROOT / "benchmarks"))


@pytest.mark.parametrize("module,json_name,blocks,arg", [b[:4] for b in render.BLOCKS],
                         ids=[f"{b[0]}:{b[1]}" for b in render.BLOCKS])
def test_pages_hold_the_rendering_of_the_benchmark_json(module, json_name, blocks, arg):
    if not (ROOT / "benchmarks" / "results" / json_name).exists():
        pytest.skip(f"benchmarks/results/{json_name} has not been written")
    out = render.rendered()
    for name in blocks:
        pages = render.checked_in(name)
        assert pages, f"no page (README.md, docs/*.md) has the <!-- {name} --> markers"
        for page, text in pages:
            # the blank lines at the markers' edges aside, byte for byte
            assert text.strip("\n") == out[name].strip("\n"), f"{page.name}: block {name} differs from {module}'s render"


def test_a_changed_number_is_caught(tmp_path, monkeypatch):
    """The comparison is not vacuous: a page whose block has one digit changed differs."""
    name = render.BLOCKS[0][2][0]
    (page, text), *_ = render.checked_in(name)
    i = next(i for i, ch in enumerate(text) if ch.isdigit())
    fake = tmp_path / page.name
    a, b = f"<!-- {name} -->", f"<!-- /{name} -->"
    fake.write_text(a + text[:i] + str((int(text[i]) + 1) % 10) + text[i + 1:] + b)
    monkeypatch.setattr(render, "block_files", lambda: [fake])
    assert f"{name} in {fake.name}" in render.differing()


def test_every_marked_block_has_a_renderer(tmp_path, monkeypatch):
    """No page keeps a marked block that nothing renders (a hand-filled table between markers), and such a
    block is caught."""
    assert not [b for b in render.differing() if "rendered by nothing" in b]
    fake = tmp_path / "page.md"
    fake.write_text("<!-- hand-table -->\n| a | 1.23 |\n<!-- /hand-table -->\n")
    monkeypatch.setattr(render, "block_files", lambda: [fake])
    assert "hand-table: marked on a page but rendered by nothing in BLOCKS" in render.differing()
