"""The import contract: the library's units point one way. Read from the source with ``ast`` (every
``import`` statement, top-level or inside a function — a lazy import is still a dependency), so a new
edge that closes a circle, or a library module that reaches up into the application layer
(``config``, ``pipeline``, ``cli``) or into reporting, fails here with the file and line.

Units are dntk's top-level modules and subpackages (``features``, ``store``, ``metrics``...)."""

import ast
from pathlib import Path

import pytest

import dntk

SRC = Path(dntk.__file__).parent
APPLICATION = {"config", "pipeline", "cli", "__main__"}
REPORTING = {"report"}
LIBRARY = {"samples", "data", "models", "training", "distill", "features", "projection", "kernels", "spectral",
           "gradient_distillation", "gradients", "metrics", "store", "errors", "validate", "lock", "resources",
           "distributed", "deprecation"}
# reporting draws and judges what it is given: it reads results, constants and row comparisons
# (dntk.gradient_distillation.compare_methods), never the units that compute features, kernels or models
REPORT_MUST_NOT_IMPORT = {"features", "kernels", "projection", "training", "distill", "models", "data"}


def _unit(path: Path) -> str:
    return path.relative_to(SRC).parts[0].removesuffix(".py")


def _imports(path: Path):
    """(line, imported dntk unit) for every import in the file; relative imports resolved."""
    rel = path.relative_to(SRC).with_suffix("").parts
    package = ["dntk", *rel] if path.name == "__init__.py" else ["dntk", *rel[:-1]]
    if path.name == "__init__.py":
        package = package[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            name = ".".join(base + ([node.module] if node.module else []))
            names = [name] if node.module else [f"{name}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for n in names:
            parts = n.split(".")
            if parts[0] == "dntk" and len(parts) > 1 and parts[1] != "__version__":
                yield node.lineno, parts[1]


def _graph():
    edges = {}
    for path in SRC.rglob("*.py"):
        if path.parent == SRC and path.name == "__init__.py":
            continue  # the top-level package only names the others (lazily)
        u = _unit(path)
        for line, v in _imports(path):
            if v != u:
                edges.setdefault(u, {}).setdefault(v, f"{path.relative_to(SRC)}:{line}")
    return edges


def test_every_unit_is_classified():
    units = {_unit(p) for p in SRC.rglob("*.py") if p.name != "__init__.py" or p.parent != SRC}
    assert units <= LIBRARY | APPLICATION | REPORTING, f"classify the new unit(s) {units - LIBRARY - APPLICATION - REPORTING}"


def test_the_library_never_imports_the_application_or_reporting_layer():
    bad = [f"{where}: {u} imports {v}" for u, out in _graph().items() if u in LIBRARY
           for v, where in out.items() if v in APPLICATION | REPORTING]
    assert not bad, "library modules reach up a layer:\n" + "\n".join(bad)


def test_reporting_computes_nothing():
    bad = [f"{where}: report imports {v}" for v, where in _graph().get("report", {}).items() if v in REPORT_MUST_NOT_IMPORT]
    assert not bad, "\n".join(bad)


def test_there_is_no_import_circle():
    edges = _graph()
    circles = []

    def walk(node, path, on_path, done):
        for nxt in edges.get(node, {}):
            if nxt in on_path:
                cyc = path[path.index(nxt):] + [nxt]
                circles.append(" -> ".join(f"{a} ({edges[a][b]})" for a, b in zip(cyc, cyc[1:])))
            elif nxt not in done:
                walk(nxt, path + [nxt], on_path | {nxt}, done)
        done.add(node)

    done = set()
    for start in sorted(edges):
        if start not in done:
            walk(start, [start], {start}, done)
    assert not circles, "import circles:\n" + "\n".join(circles)


def test_the_checker_sees_a_lazy_upward_import(tmp_path, monkeypatch):
    """The contract is not vacuous: a function-level ``from ..config import X`` in a library file is an edge."""
    f = SRC / "distill" / "methods.py"
    lines = dict(_imports(f))
    assert "config" not in lines.values()
    fake = tmp_path / "dntk" / "distill" / "x.py"
    fake.parent.mkdir(parents=True)
    fake.write_text("def f():\n    from ..config import KernelConfig\n    from . import wmdd\n")
    monkeypatch.setattr(__import__(__name__), "SRC", tmp_path / "dntk")
    assert sorted(_imports(fake)) == [(2, "config"), (3, "distill")]


@pytest.mark.parametrize("old,new", [("training_points", "training_points"), ("evaluate_distilled", "student_evaluation"),
                                     ("kernel_options", "kernel_options")])
def test_moved_names_still_answer_with_a_warning(old, new):
    from dntk.pipeline import stage1

    with pytest.warns(DeprecationWarning, match=f"dntk.pipeline.stage1.{new}"):
        assert getattr(dntk.distill, old) is getattr(stage1, new)
    with pytest.raises(AttributeError):
        dntk.distill.not_a_name  # noqa: B018


def test_renamed_stage_names_still_answer_with_a_warning():
    """The stage-3 package (was dntk.gradients), its evaluate function and features/engine.py keep their old
    names for one release, each resolving to the very object of the new name."""
    import dntk.features.engine as old_engine
    from dntk import gradient_distillation as gd
    from dntk.features import extract

    with pytest.warns(DeprecationWarning, match="dntk.gradient_distillation"):
        assert dntk.gradients.distill_gradients is gd.distill_gradients
    with pytest.warns(DeprecationWarning, match="evaluate_gradient_set"):
        assert gd.evaluate_distilled is gd.evaluate_gradient_set
    with pytest.warns(DeprecationWarning, match="dntk.features.extract"):
        assert old_engine.gradient_features is extract.gradient_features
