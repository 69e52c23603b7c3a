"""The structure the code promises: one store (atomic, cached, resumable), one feature object, one ν_c,
settings declared once and the flags generated from them, a pipeline that only orchestrates, and
the public surface of ``import dntk``."""

import argparse
import ast
import json
from dataclasses import fields
from pathlib import Path

import pytest
import torch

import dntk
from dntk import config, store
from dntk.features import FeatureResult, gradient_features
from dntk.kernels import PerClassKRR, class_scale, krr_curve, shared_normalisation
from dntk.models import SmallCNN
from dntk.projection import make

SRC = Path(dntk.__file__).parent           # the installed package (editable or not)
ROOT = Path(__file__).resolve().parents[1]  # the repository (README.md)


# --- store -------------------------------------------------------------------------------------------------
def test_atomic_writes_and_cached(tmp_path):
    calls = []

    def compute():
        calls.append(1)
        return {"x": torch.arange(3)}

    a = store.cached(tmp_path / "sub" / "v.pt", compute)
    b = store.cached(tmp_path / "sub" / "v.pt", compute)
    assert len(calls) == 1 and torch.equal(a["x"], b["x"])
    store.atomic_json({"a": torch.tensor(1.5).item()}, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1.5}
    assert not list(tmp_path.rglob("*.tmp"))  # the temporary names are renamed away


def test_digest_and_checksum_see_every_byte():
    t = torch.zeros(4)
    assert store.digest(t, "a") == store.digest(t.clone(), "a") != store.digest(t, "b")
    u = t.clone()
    u[2] = 1e-30
    assert store.digest(u) != store.digest(t)
    m = SmallCNN(1, 3)
    before = store.model_checksum(m)
    with torch.no_grad():
        m.body[1].running_mean[0] += 1  # a buffer, not a parameter
    assert store.model_checksum(m) != before


def _model_and_data(n=20, seed=0):
    torch.manual_seed(seed)
    return SmallCNN(1, 3).eval(), torch.randn(n, 1, 8, 8)


def test_feature_store_resumes_at_the_missing_shard_and_matches_one_extraction(tmp_path, monkeypatch):
    model, X = _model_and_data()
    proj = make("sjlt", k=64, seed=3)
    fs = store.FeatureStore(tmp_path / "f", shard=8)
    assert fs.extract(model, X, proj, batch_size=4, progress=False) == [0, 1, 2]
    first = fs.read(projector=proj)
    assert fs.missing() == [] and len(list((tmp_path / "f").glob("shard-*.json"))) == 3
    whole = gradient_features(model, X, proj, batch_size=4, progress=False)
    assert torch.allclose(first.features, whole.features, rtol=1e-5, atol=1e-7)
    assert torch.equal(first.logits, whole.logits) and first.projector is proj and first.paths == whole.paths
    # lose the middle shard's completion record (an interrupted write): only it is recomputed
    (tmp_path / "f" / "shard-000001.json").unlink()
    assert fs.missing() == [1]
    seen = []
    import dntk.features as features_module

    real = features_module.gradient_features

    def counting(model, X, *a, **kw):
        seen.append(X.shape[0])
        return real(model, X, *a, **kw)

    monkeypatch.setattr(features_module, "gradient_features", counting)
    assert store.FeatureStore(tmp_path / "f", shard=8).extract(model, X, proj, batch_size=4, progress=False) == [1]
    assert seen == [8]
    assert torch.equal(fs.read().features, first.features)
    # a torn array behind a complete record (a crash after the record, a truncated copy) is recomputed
    arr = tmp_path / "f" / "shard-000002.features.npy"
    arr.write_bytes(arr.read_bytes()[: arr.stat().st_size // 2])
    assert fs.missing() == [2]
    seen.clear()
    assert store.FeatureStore(tmp_path / "f", shard=8).extract(model, X, proj, batch_size=4, progress=False) == [2]
    assert seen == [4] and torch.equal(fs.read().features, first.features)
    # several processes: shard i belongs to rank i mod world
    other = store.FeatureStore(tmp_path / "g", shard=8)
    assert other.extract(model, X, proj, progress=False, rank=1, world=2) == [1]
    assert other.missing() == [0, 2]
    with pytest.raises(dntk.DNTKError, match=r"shards \[0, 2\] of 3 are missing or do not match"):
        other.read()


def test_an_interrupted_write_leaves_nothing_under_the_real_name(tmp_path, monkeypatch):
    real_save = torch.save

    def dying_save(obj, f, *a, **kw):
        f.write(b"half a file")      # dntk saves into an open temporary file
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        store.cached(tmp_path / "v.pt", lambda: {"x": 1})
    assert not (tmp_path / "v.pt").exists()
    assert list(tmp_path.iterdir()) == []          # nor a temporary file left behind
    monkeypatch.setattr(torch, "save", real_save)
    assert store.cached(tmp_path / "v.pt", lambda: {"x": 2}) == {"x": 2}  # recomputed, not the half file


def test_feature_result_subset_concat_scaled_kernel():
    model, X = _model_and_data(12)
    r = gradient_features(model, X, make("identity"), progress=False)
    F = r.features.double()
    assert torch.allclose(r.kernel(), torch.einsum("cik,cjk->cij", F, F), rtol=1e-12)
    a, b = r.subset(slice(0, 5)), r.subset(torch.arange(5, 12))
    assert torch.allclose(a.kernel(other=b), torch.einsum("cik,cjk->cij", F[:, :5], F[:, 5:]), rtol=1e-12)
    back = FeatureResult.concat([a, b])
    assert torch.equal(back.features, r.features) and torch.equal(back.logits, r.logits)
    nu = class_scale(features=r.features)
    assert torch.allclose(nu, torch.stack([torch.diagonal(F[c] @ F[c].T).mean() for c in range(3)]), rtol=1e-12)
    assert torch.allclose(nu, class_scale(kernels=r.kernel()), rtol=1e-12)
    s = r.scaled(nu.sqrt())
    assert torch.allclose(class_scale(features=s.features), torch.ones(3, dtype=torch.float64), rtol=1e-12)
    with pytest.raises(dntk.DNTKError, match="one entry per class"):
        r.scaled(torch.ones(2))
    with pytest.raises(dntk.DNTKError, match="zero diagonal"):
        class_scale(features=torch.zeros(2, 4, 3))


def test_shared_normalisation_makes_the_absolute_ridge_relative():
    """KRR with normalize=None on features scaled by √ν_c equals normalize='trace' on the raw ones."""
    model, X = _model_and_data(24)
    r = gradient_features(model, X, make("sjlt", k=128, seed=0), progress=False)
    tr, te = r.subset(slice(0, 16)), r.subset(slice(16, 24))
    trs, tes, _ = shared_normalisation(tr, te)
    y = tr.logits.double()
    p_trace = PerClassKRR(ridge=1e-3, normalize="trace").fit(tr, y).predict(te)
    p_shared = PerClassKRR(ridge=1e-3, normalize=None).fit(trs, y).predict(tes)
    assert torch.allclose(p_trace, p_shared, rtol=1e-8, atol=1e-10)


def test_krr_curve_rows_are_the_prefix_models():
    model, X = _model_and_data(30)
    r = gradient_features(model, X, make("identity"), progress=False)
    tr, te = r.subset(slice(0, 20)), r.subset(slice(20, 30))
    y = tr.logits.double()
    rows = krr_curve(y, te.logits, None, ridge=1e-4, m_values=[6, 20], train=tr, test=te)
    for row in rows:
        mm = row["m"]
        F = tr.features.double()[:, :mm]
        pred = torch.stack([
            (te.features.double()[c] @ F[c].T / torch.diagonal(F[c] @ F[c].T).mean())
            @ torch.linalg.solve(F[c] @ F[c].T / torch.diagonal(F[c] @ F[c].T).mean() + 1e-4 * torch.eye(mm),
                                 y[:mm, c]) for c in range(3)], 1)
        assert row["mse"] == pytest.approx(float(((pred - te.logits.double()) ** 2).mean()), rel=1e-6)


# --- settings and flags ----------------------------------------------------------------------------------
def test_every_setting_has_one_name_help_and_range():
    index = config._option_index()
    assert len(index) == sum(1 for _ in config._walk(config.RunConfig()))  # names unique across sections
    for section, f, value in config._walk(config.RunConfig()):
        assert f.metadata.get("help"), f.name
        config.check_value(f, value)  # every default passes its own rule


@pytest.mark.parametrize("verb", ["run", "train", "distill", "ntk"])
def test_generated_flags_default_to_the_dataclass_defaults(verb):
    from dntk.cli import build_parser

    parser = build_parser()
    extra = ["--checkpoint", "w.pt"] if verb == "ntk" else []
    args = parser.parse_args([verb, *extra])
    opts = config.options_from_args(args)
    built = config.RunConfig.from_options(**opts)
    default = config.RunConfig()
    for section, f, value in config._walk(built):
        expected = getattr(getattr(default, section), f.name) if section else getattr(default, f.name)
        if verb == "ntk" and f.name == "checkpoint":
            continue
        assert value == expected, (verb, f.name)
    if verb == "run":  # run exposes every CLI-visible setting
        from dntk.cli import DISTILL_ONLY

        cli_names = {config.option_name(f) for _, f, _ in config._walk(default) if f.metadata.get("cli", True)}
        assert cli_names - set(DISTILL_ONLY) == set(opts)


# the flags and defaults of the CLI before the settings were generated from dataclasses (HEAD ff663c8),
# for the settings every verb shares and run's own; a change here changes what users' commands mean
OLD_DEFAULTS = {
    "run": {"dataset": "digits", "data_root": None, "model": None, "image_size": None, "stem": "auto",
            "device": "cpu", "seed": 0, "out": "dntk-out", "epochs": None, "optimizer": "sgd", "lr": None,
            "train_batch_size": 128, "progress": True, "checkpoint": None, "projector": "tensorsketch", "k": None,
            "m": None, "n_test": None, "ridge": 1e-4, "targets": "logits", "exact": False, "m_grid": None,
            "batch_size": 32, "distill": "none", "ipc": 10, "distilled": None, "wmdd_iterations": 200,
            "wmdd_classes_per_step": 1, "base_model": "teacher", "student_epochs": 60, "gradient_distill": "none",
            "budget": None, "tau_v": 0.95, "tau_g": 0.9, "clusters": 10, "gd_mode": "per_class", "download": False},
    "distill": {"ipc": 10, "checkpoint": None, "wmdd_iterations": 200, "wmdd_lr": 0.05, "wmdd_bn_weight": 1.0,
                "wmdd_ce_weight": 1.0, "wmdd_feature_weight": 1.0, "wmdd_classes_per_step": 1, "epochs": None},
    "train": {"epochs": None, "optimizer": "sgd", "lr": None, "train_batch_size": 128, "seed": 0},
    "ntk": {"checkpoint": "w.pt", "model": None, "stem": "auto", "out": "dntk-out"},
}


@pytest.mark.parametrize("verb", sorted(OLD_DEFAULTS))
def test_flags_keep_their_old_defaults(verb):
    from dntk.cli import build_parser

    extra = ["--checkpoint", "w.pt"] if verb == "ntk" else []
    opts = config.options_from_args(build_parser().parse_args([verb, *extra]))
    assert {k: opts[k] for k in OLD_DEFAULTS[verb]} == OLD_DEFAULTS[verb]


def test_python_callers_get_named_errors_not_crashes(tmp_path):
    cfg = config.RunConfig.from_options(out=tmp_path / "o", data_root=None)
    assert cfg.out == str(tmp_path / "o")  # a Path is accepted and stored as a string (JSON-safe)
    for bad, message in (({"cache_data": 0}, "--cache-data 0 is out of range: it must be True or False"),
                         ({"device": 3}, "--device 3 is out of range: it must be a non-empty string"),
                         ({"out": ""}, "--out '' is out of range")):
        with pytest.raises(dntk.DNTKError, match=message):
            config.RunConfig.from_options(**bad).resolved()
    with pytest.raises(dntk.DNTKError, match="RunConfig.kernel must be a KernelConfig, got NoneType"):
        config.RunConfig(kernel=None).resolved()


def test_every_verb_builds_the_same_teacher_for_the_same_seed(tmp_path):
    from dntk.config import TeacherConfig
    from dntk.data import digits
    from dntk.training import load_or_train_teacher

    tr = digits("train")
    cfg = TeacherConfig(model="small_cnn", epochs=1)
    a = load_or_train_teacher(cfg, "digits", 8, tr, tmp_path / "a", seed=4, progress=False)
    torch.rand(100)  # whatever the global RNG did before
    b = load_or_train_teacher(cfg, "digits", 8, tr, tmp_path / "b", seed=4, progress=False)
    c = load_or_train_teacher(cfg, "digits", 8, tr, tmp_path / "c", seed=5, progress=False)
    assert a.checksum == b.checksum != c.checksum


def test_older_spellings_reach_the_same_setting():
    from dntk.cli import build_parser

    p = build_parser()
    a = p.parse_args(["distill", "--method", "kcenter", "--iterations", "7", "--classes-per-step", "3", "--bn-weight", "2"])
    b = p.parse_args(["distill", "--distill", "kcenter", "--wmdd-iterations", "7", "--wmdd-classes-per-step", "3",
                      "--wmdd-bn-weight", "2"])
    assert config.options_from_args(a) == config.options_from_args(b)
    cfg = config.RunConfig.from_options(**config.options_from_args(a))
    assert cfg.distill.wmdd_options()["iterations"] == 7 and cfg.distill.wmdd_options()["bn_weight"] == 2.0


def test_every_wmdd_knob_is_reachable_from_dntk_run():
    from dntk.cli import build_parser
    from dntk.distill import WMDDConfig

    args = build_parser().parse_args(["run", "--wmdd-lr", "0.25", "--wmdd-bn-weight", "3", "--wmdd-ce-weight", "0.5",
                                      "--wmdd-feature-weight", "0", "--wmdd-iterations", "9"])
    cfg = config.RunConfig.from_options(**config.options_from_args(args))
    w = WMDDConfig(ipc=1, **cfg.distill.wmdd_options())
    assert (w.lr, w.bn_weight, w.ce_weight, w.feature_weight, w.iterations) == (0.25, 3.0, 0.5, 0.0, 9)


# --- the pipeline only orchestrates; packages hold no code in __init__ --------------------------------------
_COMPUTE_CALLS = {"einsum", "solve", "cholesky", "cholesky_ex", "eigh", "eigvalsh", "svd", "lstsq", "inv", "matmul",
                  "bmm", "mm", "savefig", "plot", "subplots", "figure"}


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            yield f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")


@pytest.mark.parametrize("path", sorted((SRC / "pipeline").glob("*.py")), ids=lambda p: p.name)
def test_pipeline_computes_no_kernel_solve_or_figure(path):
    tree = ast.parse(path.read_text())
    assert not any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.MatMult) for n in ast.walk(tree))
    assert not (set(_calls(tree)) & _COMPUTE_CALLS)
    imported = {a.name for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(name.startswith(("matplotlib", "numpy", "scipy", "sklearn")) for name in imported)


@pytest.mark.parametrize("path", sorted(p for p in SRC.rglob("__init__.py") if p.parent != SRC),
                         ids=lambda p: p.parent.name)
def test_package_init_files_only_import(path):
    tree = ast.parse(path.read_text())
    for node in tree.body:
        docstring = isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant)
        all_list = isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["__all__"]
        # the one other statement allowed: old names kept for a release (dntk.deprecation.moved)
        alias = (isinstance(node, ast.Assign) and [t.id for t in node.targets] == ["__getattr__"]
                 and isinstance(node.value, ast.Call) and getattr(node.value.func, "id", "") == "moved")
        assert docstring or all_list or alias or isinstance(node, (ast.Import, ast.ImportFrom)), \
            f"{path}: line {node.lineno} is code, not an import"


def test_import_dntk_shows_the_whole_surface():
    for name in ("data", "models", "training", "distill", "features", "projection", "kernels", "spectral", "gradient_distillation",
                 "metrics", "store", "config", "pipeline", "report"):
        assert name in dir(dntk) and getattr(dntk, name).__name__ == f"dntk.{name}"
    assert dntk.run is dntk.pipeline.run and dntk.RunConfig is dntk.config.RunConfig
    assert dntk.gradient_features is dntk.features.gradient_features
    assert callable(dntk.kernels.PerClassKRR) and callable(dntk.gradient_distillation.distill_gradients)
    assert callable(dntk.distill.distill_dataset) and callable(dntk.training.load_or_train_teacher)
    with pytest.raises(AttributeError):
        dntk.not_a_thing  # noqa: B018
    # no name means two things: stage 1 distillers and stage 3 methods are distinct constants
    assert set(dntk.distill.DISTILLERS) == {"random", "kcenter", "wmdd", "kernel-greedy", "kernel-herding"}
    assert dntk.gradient_distillation.GRADIENT_METHODS == ("local-global",) + dntk.gradient_distillation.SELECTION_METHODS + \
        dntk.gradient_distillation.TARGET_METHODS + dntk.gradient_distillation.SPECTRAL_METHODS


def test_results_json_schema_is_documented():
    """Every RunResult field appears as a row of the docs' results.json table, and no other row."""
    from dntk.pipeline import RunResult

    page = (ROOT / "docs" / "results-schema.md").read_text()
    section = page[page.index("<!-- results-schema -->"):page.index("<!-- /results-schema -->")]
    rows = {line.split("|")[1].strip().strip("`") for line in section.splitlines() if line.startswith("| `")}
    assert rows == {f.name for f in fields(RunResult)}


def test_argparse_types_name_the_range():
    f = {x.name: x for x in fields(config.KernelConfig)}["ridge"]
    parse = config._argparse_type(f)
    assert parse("0") == 0.0
    for bad in ("-1", "nan", "inf", "x"):
        with pytest.raises(argparse.ArgumentTypeError, match="a finite number ≥ 0"):
            parse(bad)
