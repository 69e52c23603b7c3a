"""Sphinx configuration of dntk's documentation (built strictly, warnings as errors, by .ci/run:
``python3 -m sphinx -W -b html docs docs/_build``).

Pages are MyST markdown; the API reference is generated from the docstrings (autodoc + napoleon); the
command-line reference is generated from the argument parser at build time (docs/_generated/)."""

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import dntk  # noqa: E402
from dntk.cli import build_parser  # noqa: E402

project = "dntk"
release = version = dntk.__version__
extensions = ["myst_parser", "sphinx.ext.autodoc", "sphinx.ext.napoleon"]
source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
exclude_patterns = ["_build"]
myst_heading_anchors = 3
autodoc_member_order = "bysource"
autodoc_typehints = "none"           # the docstrings state shapes and types in words
napoleon_google_docstring = True
napoleon_numpy_docstring = False
html_theme = "alabaster"
suppress_warnings = ["myst.xref_missing"]   # the pages name README sections in prose, not as links


def _cli_reference() -> str:
    """Every verb's --help, as the parser prints it (so the reference cannot drift from the flags)."""
    parser = build_parser()
    out = ["# Command-line reference", "", "Generated from `dntk.cli.build_parser()` when the docs are built.", ""]
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    out += ["## dntk", "", "```text", parser.format_help().rstrip(), "```", ""]
    for verb, p in sub.choices.items():
        out += [f"## dntk {verb}", "", "```text", p.format_help().rstrip(), "```", ""]
        for a in p._actions:
            if a.__class__.__name__ == "_SubParsersAction":
                for action, q in a.choices.items():
                    out += [f"### dntk {verb} {action}", "", "```text", q.format_help().rstrip(), "```", ""]
    return "\n".join(out)


gen = HERE / "_generated"
gen.mkdir(exist_ok=True)
(gen / "cli-reference.md").write_text(_cli_reference())


# --- the docstrings' own layout, read as RST ---------------------------------------------------------
# dntk's docstrings are written for `help()`: "name: text" lines with hanging, indented continuations and
# |x| for norms. Before autodoc renders them (after napoleon has turned Args:/Returns: into fields), hanging
# continuations are joined to their line, runs of "name: text" lines become a bullet list, and a bare |
# is escaped — literal blocks (after "::") and directives are left alone.
import re  # noqa: E402

_ITEM = re.compile(r"^(\s*)([\w`*\[\]{}().,/'+|=≥≤<>→ -]{1,48}?): \S")


def _indent(s: str) -> int:
    return len(s) - len(s.lstrip(" "))


def _tidy(app, what, name, obj, options, lines):
    out, literal_at = [], None
    for line in lines:
        if literal_at is not None:
            if line.strip() and _indent(line) <= literal_at:
                literal_at = None
            else:
                out.append(line)
                continue
        prev = out[-1] if out else ""
        if (line.strip() and prev.strip() and _indent(line) > _indent(prev) and not prev.rstrip().endswith("::")
                and not prev.lstrip().startswith("..") and not line.lstrip().startswith(("..", "- ", "* "))):
            out[-1] = prev.rstrip() + " " + line.strip()
            continue
        if line.rstrip().endswith("::"):
            literal_at = _indent(line)
        out.append(line)
    res = []
    for i, line in enumerate(out):
        stripped = line.lstrip()
        is_item = bool(_ITEM.match(line)) and not stripped.startswith((":", "..", "- ", "* "))
        nxt = out[i + 1] if i + 1 < len(out) else ""
        prv = out[i - 1] if i else ""
        run = is_item and ((_ITEM.match(nxt) and _indent(nxt) == _indent(line)) or
                           (_ITEM.match(prv) and _indent(prv) == _indent(line)))
        if run:
            if res and res[-1].strip() and not res[-1].lstrip().startswith("- "):
                res.append("")
            line = " " * _indent(line) + "- " + stripped
        elif res and res[-1].lstrip().startswith("- ") and line.strip() and _indent(line) <= _indent(res[-1]):
            res.append("")
        parts = line.split("``")   # a bare | outside ``literals`` (a norm |x|) is not a substitution
        line = "``".join(re.sub(r"(?<!\\)\|", r"\\|", t) if k % 2 == 0 else t for k, t in enumerate(parts))
        res.append(line)
    lines[:] = res


def setup(app):
    app.connect("autodoc-process-docstring", _tidy, priority=600)
