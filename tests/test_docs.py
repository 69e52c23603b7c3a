"""Docs that cannot go stale: the Sphinx site builds with every warning an error (broken references,
pages outside the toctree, docstrings that are not valid RST, a CLI reference regenerated from the
parser), the extension guide's code runs as written, and the README stays a front page."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_build_with_warnings_as_errors(tmp_path):
    pytest.importorskip("sphinx", reason="the docs extra (sphinx, myst-parser) is part of the test extra")
    res = subprocess.run([sys.executable, "-m", "sphinx", "-W", "--keep-going", "-q", "-b", "html", str(ROOT / "docs"),
                          str(tmp_path / "html")], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    ref = (ROOT / "docs" / "_generated" / "cli-reference.md").read_text()
    for verb in ("run", "train", "distill", "ntk", "check-model", "reproduce", "store verify"):
        assert f"## dntk {verb}\n" in ref or f"### dntk {verb}\n" in ref, verb
    assert "--gradient-distill" in ref and (tmp_path / "html" / "api" / "index.html").exists()


def test_the_extension_guide_runs_as_written():
    """docs/extending.md's two code blocks: the RMSNorm rule written from scratch, then check_rule on a model."""
    from dntk.features.capture.rules import register, rule_for
    from dntk.features.capture.rules.norms import RMSNormRule

    import torch.nn.functional as F

    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "extending.md").read_text(), re.S)
    assert len(blocks) == 2
    builtin = rule_for(F.rms_norm)
    try:
        ns = {}
        exec(blocks[0], ns)                      # registers RMSNormRule(kind="my_rms_norm"), replacing the built-in
        assert rule_for(F.rms_norm).kind == "my_rms_norm"
        from dntk.features import check_rule
        import torch
        import torch.nn as nn

        res = check_rule("my_rms_norm", nn.Sequential(nn.Linear(6, 8), nn.RMSNorm(8), nn.Linear(8, 3)),
                         torch.randn(4, 6), sketch=None)
        assert res.exact and res.rules_taken["my_rms_norm"] == 1
    finally:
        register(builtin, replace=True)
    exec(blocks[1], {})                          # the built-in rule, via check_rule


def test_the_readme_is_a_front_page_with_working_links():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    for target in re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)\)", text):
        target = target.replace("_generated/cli-reference.md", "conf.py")   # generated at build time
        assert (ROOT / target).exists(), f"README links to {target}, which does not exist"
