"""`dntk run` end to end on a tiny configuration of the embedded default, and its errors."""

import json
import subprocess
import sys

import pytest

import dntk
from dntk.cli import main

TINY = ["--m", "30", "--n-test", "40", "--epochs", "3", "--k", "256", "--quiet"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert main(["run", "--out", str(out), "--exact", *TINY]) == 0
    return out


def test_results_json_is_complete_and_consistent(tiny_run):
    res = json.loads((tiny_run / "results.json").read_text())
    km = res["kernel_model"]
    for key in ("fidelity", "accuracy", "mse", "condition_number", "min_eigenvalue"):
        assert isinstance(km[key], float)
    assert 0 <= km["fidelity"] <= 1 and 0 <= km["accuracy"] <= 1 and km["mse"] >= 0
    assert km["condition_number"] >= 1
    assert 0 <= res["teacher"]["test_accuracy"] <= 1
    c = res["counts"]
    assert (c["n_real"], c["m"], c["n_test"]) == (1347, 30, 40)
    assert c["per_sample_gradients"] == (30 + 40) * 10
    # the small CNN: conv/linear weights factored, biases and BatchNorm affines in closed form, nothing else
    assert set(res["gradient_paths"]) == {"factored", "closed"} and abs(sum(res["gradient_paths"].values()) - 1) < 1e-9
    assert {"data", "teacher", "features_train", "features_test", "kernel_model", "exact"} <= set(res["timings_s"])
    assert res["peak_memory_mb"] > 0
    # the curve's last point is the reported model, and m grows along it
    curve = res["curves"]["projected"]
    assert curve[-1]["m"] == 30 and [r["m"] for r in curve] == sorted(r["m"] for r in curve)
    assert curve[-1]["fidelity"] == km["fidelity"]
    # exact comparison: a k=256 sketch of P≈29k parameters is close to, but not, the exact kernel
    ex = res["exact"]
    assert 0 < ex["kernel_relative_error"] < 0.5 and 0.8 < ex["kernel_alignment"] <= 1
    assert set(ex["kernel_model"]) == set(km)
    assert (tiny_run / "figure1.png").stat().st_size > 10_000
    # the file is RunResult, key for key, and reads back as one
    from dataclasses import fields

    assert set(res) == {f.name for f in fields(dntk.RunResult)}
    assert dntk.RunResult.load(tiny_run / "results.json").to_dict() == res
    assert res["config"]["kernel"]["m"] == 30 and res["config"]["features"]["k"] == 256


def test_rerun_resumes_from_cached_stages(tiny_run):
    teacher = tiny_run / "teacher" / "last.pt"
    feats = sorted(tiny_run.glob("features-*/shard-*"))
    assert len(feats) >= 6  # train and test: features, logits, labels and a record per shard
    before = [teacher.stat().st_mtime_ns] + [f.stat().st_mtime_ns for f in feats]
    first = json.loads((tiny_run / "results.json").read_text())
    assert main(["run", "--out", str(tiny_run), "--exact", *TINY]) == 0
    after = [teacher.stat().st_mtime_ns] + [f.stat().st_mtime_ns for f in feats]
    assert before == after  # nothing recomputed
    second = json.loads((tiny_run / "results.json").read_text())
    assert second["kernel_model"] == first["kernel_model"]


def test_errors_are_named(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path), "--m", "5000", "--epochs", "1", "--quiet"]) == 1
    assert "--m 5000 is larger than the training set (1347 images)" in capsys.readouterr().err
    assert main(["run", "--dataset", "folder", "--data-root", str(tmp_path / "none"), "--quiet"]) == 1
    assert "does not exist" in capsys.readouterr().err
    # names outside the generated choices are refused by argparse, listing the valid ones
    with pytest.raises(SystemExit) as e:
        main(["run", "--out", str(tmp_path), "--quiet", "--projector", "fjlt"])
    assert e.value.code == 2
    assert ("argument --projector: invalid choice: 'fjlt' (choose from 'identity', 'gaussian', 'rademacher', 'sjlt', "
            "'tensorsketch')") in capsys.readouterr().err
    # --model is free-form (torchvision:NAME, timm:NAME, hf:DIR, factories) but its form is checked by argparse
    for value, says in (("vgg", "unknown model 'vgg'; use resnet18, small_cnn, torchvision:NAME"),
                        ("timm:", "name the model after 'timm:'"), ("pkg.mod:not-a-name", "a factory is")):
        with pytest.raises(SystemExit) as e:
            main(["run", "--out", str(tmp_path), "--quiet", "--model", value])
        assert e.value.code == 2
        assert says in capsys.readouterr().err


def test_console_script_help():
    r = subprocess.run([sys.executable, "-m", "dntk.cli", "run", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for flag in ("--dataset", "--data-root", "--model", "--checkpoint", "--image-size", "--projector", "--k", "--m",
                 "--device", "--seed", "--out", "--exact"):
        assert flag in r.stdout


def test_run_with_distillation_student_and_gradient_distillation(tmp_path):
    """Stage 1 (random subset, student base model) and stage 3 (Algorithm 1, budget 3) end to end."""
    out = tmp_path / "staged"
    args = ["run", "--out", str(out), "--epochs", "3", "--k", "256", "--n-test", "60", "--quiet",
            "--distill", "random", "--ipc", "6", "--base-model", "student", "--student-epochs", "3",
            "--gradient-distill", "local-global", "--budget", "3", "--clusters", "3"]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["distillation"]["method"] == "random" and res["counts"]["m"] == 60
    assert res["counts"]["n_real_over_m"] == pytest.approx(1347 / 60)
    assert res["base_model"]["name"] == "student" and 0 <= res["base_model"]["test_accuracy"] <= 1
    assert set(res["kernel_model_teacher"]) == set(res["kernel_model"])  # Figure 1: both base models
    assert res["teacher"]["checksum"] != res["base_model"]["checksum"]  # the teacher keeps its own identity
    assert res["curves"]["teacher"][-1]["m"] == res["curves"]["projected"][-1]["m"] == 60
    gd = res["gradient_distillation"]
    assert gd["s"] == [3] * 10 and gd["compression"] == pytest.approx(20.0)
    assert len(gd["ranks"]["all_points"]) == 10
    for name in ("figure1.png", "figure2.png", "figure3.png", "figure5.png", "figure4-class0.png"):
        assert (out / name).stat().st_size > 5_000
    assert (out / "distill-random-ipc6-seed0" / "distilled.pt").exists()


def test_distill_verb_and_reuse_in_run(tmp_path):
    assert main(["distill", "--distill", "kcenter", "--ipc", "4", "--epochs", "2", "--out", str(tmp_path), "--quiet"]) == 0
    folder = tmp_path / "distill-kcenter-ipc4-seed0"
    assert (folder / "manifest.json").exists()
    assert main(["run", "--out", str(tmp_path), "--epochs", "2", "--k", "128", "--n-test", "30", "--quiet",
                 "--distilled", str(folder)]) == 0
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["counts"]["m"] == 40 and res["distillation"]["method"] == "kcenter"


def test_distill_verb_wmdd_grouped(tmp_path):
    assert main(["distill", "--method", "wmdd", "--ipc", "2", "--iterations", "3", "--classes-per-step", "5",
                 "--epochs", "1", "--out", str(tmp_path), "--quiet"]) == 0
    folder = tmp_path / "distill-wmdd-ipc2-seed0"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["settings"]["classes_per_step"] == 5 and manifest["settings"]["iterations"] == 3
    assert len(manifest["per_class"]) == 10 and len(list((folder / "classes").glob("class*.pt"))) == 10


def test_stage_errors(tmp_path, capsys):
    assert main(["run", "--out", str(tmp_path), "--budget", "600", "--quiet"]) == 1
    assert "--budget 600 is larger than --m 500" in capsys.readouterr().err
    assert main(["run", "--out", str(tmp_path), "--gradient-distill", "fps", "--quiet"]) == 1
    assert "--gradient-distill fps needs --budget s" in capsys.readouterr().err
    assert main(["distill", "--out", str(tmp_path), "--quiet"]) == 1
    assert "dntk distill needs a method: --distill wmdd, random, kcenter, kernel-greedy or kernel-herding" in \
        capsys.readouterr().err
    for flag, value, message in (("--gradient-distill", "pca", "invalid choice: 'pca' (choose from 'none', 'local-global',"
                                                              " 'random', 'fps', 'kmeans', 'leverage', "
                                                              "'target-direction', 'hybrid', 'eigen', 'hybrid-eigen')"),
                                 ("--tau-v", "1.5", "must be a finite number > 0 and ≤ 1, got 1.5"),
                                 ("--distill", "dc", "invalid choice: 'dc' (choose from 'none', 'random', 'kcenter', "
                                                     "'wmdd', 'kernel-greedy', 'kernel-herding')")):
        with pytest.raises(SystemExit):
            main(["run", "--out", str(tmp_path), "--quiet", flag, value])
        assert f"argument {flag}" in (err := capsys.readouterr().err) and message in err
    assert list(tmp_path.iterdir()) == []


def test_train_and_ntk_verbs(tmp_path, capsys):
    assert main(["train", "--epochs", "2", "--out", str(tmp_path), "--quiet"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert 0 < info["best_val_accuracy"] <= 1 and info["best_epoch"] in (1, 2)
    assert main(["ntk", "--checkpoint", info["checkpoint"], "--n", "3", "--out", str(tmp_path), "--quiet"]) == 0
    import torch

    K = torch.load(tmp_path / "ntk-per_class.pt")
    assert K.shape == (10, 3, 3) and K.dtype == torch.float64
    assert torch.allclose(K, K.transpose(1, 2)) and bool((torch.diagonal(K, dim1=1, dim2=2) > 0).all())


def test_interrupted_feature_extraction_resumes_at_the_missing_shard(tmp_path):
    """Features are saved in atomic shards: losing one (as an interruption would) recomputes only
    that shard, and the results are unchanged."""
    from dntk import RunConfig, run

    cfg = RunConfig.from_options(out=str(tmp_path), m=30, n_test=50, epochs=2, k=128, progress=False, feature_chunk=16)
    first = run(cfg)
    records = sorted(tmp_path.glob("features-test-*/shard-*.json"))
    assert len(records) == 4  # 50 test images in shards of 16
    stamps = {c: c.stat().st_mtime_ns for c in records}
    records[2].unlink()
    second = run(cfg)
    assert records[2].exists()
    assert all(c.stat().st_mtime_ns == stamps[c] for c in records if c != records[2])
    assert second.kernel_model == first.kernel_model


@pytest.mark.parametrize("verb,flag,value,rule", [
    ("run", "--k", "0", "an integer ≥ 1"), ("run", "--k", "-4", "an integer ≥ 1"),
    ("run", "--budget", "0", "an integer ≥ 1"), ("run", "--budget", "-1", "an integer ≥ 1"),
    ("run", "--m", "0", "an integer ≥ 1"), ("run", "--n-test", "0", "an integer ≥ 1"),
    ("run", "--ipc", "0", "an integer ≥ 1"), ("run", "--epochs", "0", "an integer ≥ 1"),
    ("run", "--batch-size", "0", "an integer ≥ 1"), ("run", "--train-batch-size", "0", "an integer ≥ 1"),
    ("run", "--clusters", "0", "an integer ≥ 1"), ("run", "--student-epochs", "0", "an integer ≥ 1"),
    ("run", "--image-size", "0", "an integer ≥ 1"), ("run", "--wmdd-classes-per-step", "0", "an integer ≥ 1"),
    ("run", "--wmdd-iterations", "-1", "an integer ≥ 0"), ("run", "--lr", "0", "a finite number > 0"), ("run", "--tau-g", "0", "a finite number > 0 and ≤ 1"),
    ("run", "--m-grid", "10,x", "comma-separated integers ≥ 1"), ("run", "--m-grid", "10,0", "comma-separated integers ≥ 1"),
    ("run", "--wmdd-bn-weight", "-1", "a finite number ≥ 0"), ("distill", "--bn-weight", "inf", "a finite number ≥ 0"),
    ("run", "--ridge", "-0.5", "a finite number ≥ 0"), ("run", "--k", "4k", "an integer ≥ 1"),
    ("distill", "--ipc", "0", "an integer ≥ 1"), ("distill", "--iterations", "-5", "an integer ≥ 0"),
    ("distill", "--classes-per-step", "0", "an integer ≥ 1"), ("distill", "--wmdd-lr", "0", "a finite number > 0"),
    ("ntk", "--n", "0", "an integer ≥ 1"),
])
def test_nonsense_numbers_are_refused_not_defaulted(tmp_path, capsys, verb, flag, value, rule):
    """`--k 0` used to mean the default (code did `k or default`): now argparse refuses it, naming
    the flag and the valid range, before any work is done."""
    extra = ["--checkpoint", "none.pt"] if verb == "ntk" else []
    with pytest.raises(SystemExit) as e:
        main([verb, "--out", str(tmp_path), "--quiet", *extra, flag, value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err or f"/{flag}: " in err  # an older spelling is named beside the flag
    assert f": must be {rule}" in err
    assert list(tmp_path.iterdir()) == []  # nothing trained or written


@pytest.mark.parametrize("field,value,message", [
    ("k", 0, "--k 0 is out of range: it must be an integer ≥ 1, or leave it unset for the default (min(4096, P/2))"),
    ("budget", 0, "--budget 0 is out of range: it must be an integer ≥ 1"),
    ("m", -3, "--m -3 is out of range: it must be an integer ≥ 1"),
    ("n_test", 0, "--n-test 0 is out of range"), ("epochs", 0, "--epochs 0 is out of range"),
    ("batch_size", 0, "--batch-size 0 is out of range"), ("ipc", 0, "--ipc 0 is out of range"),
    ("clusters", 0, "--clusters 0 is out of range"), ("feature_chunk", 0, "--feature-chunk 0 is out of range"),
    ("batch_size", None, "--batch-size None is out of range: it must be an integer ≥ 1"),
    ("k", 2.5, "--k 2.5 is out of range"), ("lr", 0.0, "--lr 0.0 is out of range: it must be a finite number > 0"),
    ("ridge", float("nan"), "--ridge nan is out of range: it must be a finite number ≥ 0"),
    ("m_grid", [10, 0], "--m-grid [10, 0] is out of range: it must be comma-separated integers ≥ 1"),
    ("m_grid", [], "--m-grid [] is out of range"), ("tau_v", 0.0, "--tau-v 0.0 is out of range"),
    ("wmdd_iterations", -1, "--wmdd-iterations -1 is out of range: it must be an integer ≥ 0"),
    ("projector", "fjlt", "--projector 'fjlt' is not a valid choice: it must be one of identity, gaussian, rademacher, "
                          "sjlt, tensorsketch"),
    ("gradient_distill", "pca", "--gradient-distill 'pca' is not a valid choice"),
    ("exact", "yes", "--exact 'yes' is out of range"),
])
def test_run_config_refuses_nonsense_numbers(tmp_path, field, value, message):
    """Python callers bypass argparse: RunConfig.resolved() applies the same field rules."""
    from dntk import DNTKError, RunConfig, run

    with pytest.raises(DNTKError) as e:
        run(RunConfig.from_options(out=str(tmp_path / "out"), progress=False, **{field: value}))
    assert message in str(e.value)
    assert not (tmp_path / "out").exists()


def test_run_config_none_means_default():
    from dntk.config import TeacherConfig
    from dntk.training import teacher_train_config

    c = dntk.RunConfig().resolved()
    assert (c.kernel.m, c.teacher.epochs, c.data.image_size, c.features.k, c.gradients.budget, c.data.n_test) == \
        (500, 30, 8, None, None, None)
    assert c.teacher.model == "small_cnn" and dntk.RunConfig.from_options(dataset="folder").resolved().teacher.model \
        == "resnet18"
    assert teacher_train_config("digits", TeacherConfig()).epochs == 30
    assert teacher_train_config("folder", TeacherConfig()).epochs == 15
    assert teacher_train_config("folder", TeacherConfig(epochs=2)).epochs == 2
    # passed through, refused by train(), not defaulted
    assert teacher_train_config("digits", TeacherConfig(epochs=0)).epochs == 0
    with pytest.raises(dntk.DNTKError, match="unknown setting 'epoch'; valid names: .*epochs"):
        dntk.RunConfig.from_options(epoch=3)


def test_onehot_targets_mse_is_against_the_onehot_targets(tiny_run, tmp_path):
    """With --targets onehot, `mse` is the error against the one-hot targets the regression fitted
    (recomputed here with numpy from the saved features), and `mse_vs_teacher_logits` against the
    teacher's logits."""
    import numpy as np

    from dntk.data import balanced_indices, load_splits

    out = tmp_path / "onehot"
    assert main(["run", "--out", str(out), "--targets", "onehot", "--m-grid", "30",
                 "--checkpoint", str(tiny_run / "teacher" / "best.pt"), *TINY]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["targets"] == "onehot"

    def load(tag):  # the store's .npy arrays read with numpy alone, in shard order
        (folder,) = out.glob(f"features-{tag}-*")
        feats, logits = sorted(folder.glob("shard-*.features.npy")), sorted(folder.glob("shard-*.logits.npy"))
        return (np.concatenate([np.load(p).astype(np.float64) for p in feats], 1),
                np.concatenate([np.load(p).astype(np.float64) for p in logits]))

    (F_tr, _), (F_te, logits_te) = load("train"), load("test")
    train, test = load_splits("digits", image_size=8)
    y_tr = train.labels[balanced_indices(train.labels, 30, 10, seed=0)].numpy()
    y_te = test.labels[balanced_indices(test.labels, 40, 10)].numpy()
    Y_tr, Y_te = np.eye(10)[y_tr], np.eye(10)[y_te]
    pred = np.zeros_like(Y_te)
    for c in range(10):  # per-class KRR, trace-normalised kernel, relative ridge 1e-4
        K = F_tr[c] @ F_tr[c].T
        nu = np.diag(K).mean()
        alpha = np.linalg.solve(K / nu + 1e-4 * np.eye(30), Y_tr[:, c])
        pred[:, c] = (F_te[c] @ F_tr[c].T / nu) @ alpha
    km = res["kernel_model"]
    assert km["mse"] == pytest.approx(((pred - Y_te) ** 2).mean(), rel=1e-8)
    assert km["mse_vs_teacher_logits"] == pytest.approx(((pred - logits_te) ** 2).mean(), rel=1e-8)
    assert km["accuracy"] == pytest.approx((pred.argmax(1) == y_te).mean())
    assert abs(km["mse"] - km["mse_vs_teacher_logits"]) > 0.05  # logits are not one-hot: the two differ


def test_logit_targets_report_one_mse(tiny_run):
    km = json.loads((tiny_run / "results.json").read_text())["kernel_model"]
    assert km["mse"] == km["mse_vs_teacher_logits"]
