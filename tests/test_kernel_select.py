"""Kernel-aware stage 1: the greedy's closed-form updates against refitting the kernel model on
every candidate set, the pool / random pairing, the Jacobian accounting, and the CLI path."""

import json

import pytest
import torch

from dntk import DNTKError
from dntk.data import digits
from dntk.distill import distill_dataset, greedy_kernel_selection, pool_indices, select_real
from dntk.features import FeatureResult, gradient_features
from dntk.kernels import PerClassKRR
from dntk.models import SmallCNN
from dntk.projection import make as make_projector
from dntk.training import TrainConfig, train


def _problem(n=24, C=3, k=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(C, n, k, generator=g, dtype=torch.float64)
    F[:, :, 0] *= 3      # some anisotropy so that choices differ
    labels = torch.arange(n) % C
    Y = torch.randn(n, C, generator=g, dtype=torch.float64) * 2
    return F, Y, labels


def _reference(F, Y, S, ridge):
    """Pool error and posterior variance of the GP mean with kernel K_c/ν_c(pool), noise ridge, fitted
    on the pool rows S — refitted from scratch with PerClassKRR (features pre-scaled, no own normalisation)."""
    C, n, _ = F.shape
    nu = (F * F).sum(2).mean(1)
    Fs = F / nu.sqrt()[:, None, None]
    if not S:
        return float((Y ** 2).mean()), float(torch.ones(C).mean())
    model = PerClassKRR(ridge=ridge, normalize=None, form="dual").fit(Fs[:, S], Y[S])
    err = float(((model.predict(Fs) - Y) ** 2).mean())
    var = 0.0
    for c in range(C):
        K = Fs[c] @ Fs[c].T
        KS = K[:, S]
        post = K - KS @ torch.linalg.solve(K[S][:, S] + ridge * torch.eye(len(S), dtype=K.dtype), KS.T)
        var += float(torch.diagonal(post).mean())
    return err, var / C


@pytest.mark.parametrize("criterion", ["error", "variance"])
def test_greedy_matches_refitting_at_every_step(criterion):
    F, Y, labels = _problem()
    ridge = 1e-2
    sel = greedy_kernel_selection(F, Y, labels, 3, ridge=ridge, criterion=criterion)
    order = sel.index.tolist()
    assert len(order) == 9 and len(set(order)) == 9
    assert torch.bincount(labels[sel.index], minlength=3).tolist() == [3, 3, 3]
    for t in range(len(order) + 1):
        err, var = _reference(F, Y, order[:t], ridge)
        assert sel.pool_error[t] == pytest.approx(err, rel=1e-8, abs=1e-10)
        assert sel.pool_variance[t] == pytest.approx(var, rel=1e-8, abs=1e-10)
    # every pick is the best allowed candidate by brute force (refit on S + j for every j)
    for t in range(len(order)):
        S = order[:t]
        full = [c for c in range(3) if sum(int(labels[i]) == c for i in S) >= 3]
        allowed = [j for j in range(F.shape[1]) if j not in S and int(labels[j]) not in full]
        score = {j: _reference(F, Y, S + [j], ridge)[0 if criterion == "error" else 1] for j in allowed}
        assert order[t] == min(score, key=score.get)


def test_long_runs_stay_exact_through_the_recursions_and_their_refresh():
    """150 steps cross the every-64-steps refresh of the recursive Σr and column norms: the pool error
    at several t still equals a from-scratch refit (k = 40 < 150 points: a rank-deficient kernel too)."""
    F, Y, labels = _problem(n=240, C=3, k=40, seed=4)
    ridge = 1e-3
    sel = greedy_kernel_selection(F, Y, labels, 50, ridge=ridge)
    order = sel.index.tolist()
    for t in (63, 64, 65, 128, 150):
        assert sel.pool_error[t] == pytest.approx(_reference(F, Y, order[:t], ridge)[0], rel=1e-7, abs=1e-10)


def test_error_greedy_beats_random_choices_on_the_pool():
    F, Y, labels = _problem(n=60, seed=1)
    sel = greedy_kernel_selection(F, Y, labels, 4, ridge=1e-3)
    g = torch.Generator().manual_seed(0)
    random_errors = []
    for _ in range(20):
        S = torch.cat([torch.nonzero(labels == c).flatten()[torch.randperm(20, generator=g)[:4]] for c in range(3)])
        random_errors.append(_reference(F, Y, S.tolist(), 1e-3)[0])
    assert sel.pool_error[-1] < min(random_errors)


def test_bad_input():
    F, Y, labels = _problem()
    with pytest.raises(DNTKError, match="ipc"):
        greedy_kernel_selection(F, Y, labels, 0)
    with pytest.raises(DNTKError, match="enlarge the pool"):
        greedy_kernel_selection(F, Y, labels, 9)
    with pytest.raises(DNTKError, match="criterion"):
        greedy_kernel_selection(F, Y, labels, 2, criterion="loss")
    with pytest.raises(DNTKError, match="ridge"):
        greedy_kernel_selection(F, Y, labels, 2, ridge=0.0)
    with pytest.raises(DNTKError, match=r"\[n, C\]"):
        greedy_kernel_selection(F, Y.T, labels, 2)


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    tr, te = digits("train"), digits("val")
    torch.manual_seed(0)
    model = SmallCNN(1, 10)
    train(model, tr, te, TrainConfig(epochs=2, augment="shift"), tmp_path_factory.mktemp("t"), progress=False)
    return model.eval(), tr, te


def test_pool_starts_with_the_random_subset(digits_teacher):
    _, tr, _ = digits_teacher
    rnd = select_real(tr, 5, "random", seed=3)
    pool = pool_indices(tr, 5, 3, seed=3)
    first = torch.cat([pool[c * 15: c * 15 + 5] for c in range(10)])
    assert torch.equal(tr.tensors(first)[0], rnd.images)
    assert len(pool) == 150 and len(set(pool.tolist())) == 150


def test_select_computes_only_the_pool_and_records_the_cost(digits_teacher, tmp_path):
    model, tr, _ = digits_teacher
    proj = make_projector("tensorsketch", k=64, seed=0)
    ds = distill_dataset("kernel-greedy", model, tr, 2, tmp_path / "kg", seed=1, progress=False,
                         kernel_options={"projector": proj, "pool_factor": 3})
    man = json.loads((tmp_path / "kg" / "manifest.json").read_text())
    assert man["jacobians"] == {**man["jacobians"], "pool_images": 60, "per_logit_gradients": 600,
                                "computed_here": 600}
    pool = torch.tensor(man["pool_indices"])
    assert torch.equal(pool, pool_indices(tr, 2, 3, seed=1))
    assert set(man["indices"]) <= set(man["pool_indices"])
    assert torch.bincount(ds.labels, minlength=10).tolist() == [2] * 10
    assert man["pool_error"][-1] < man["pool_error"][0]
    # the same choice from precomputed pool features (what a benchmark reads from a store): no Jacobians
    X, _ = tr.tensors(pool)
    feats = gradient_features(model, X, proj, progress=False)
    ds2 = distill_dataset("kernel-greedy", model, tr, 2, tmp_path / "kg2", seed=1, progress=False,
                          kernel_options={"projector": proj, "pool_factor": 3, "pool_features": feats})
    man2 = json.loads((tmp_path / "kg2" / "manifest.json").read_text())
    assert man2["indices"] == man["indices"] and man2["jacobians"]["computed_here"] == 0
    assert torch.equal(ds2.images, ds.images)
    # the selection is the greedy on those features (the pipeline adds nothing of its own)
    sel = greedy_kernel_selection(feats, feats.logits, tr.labels[pool], 2)
    assert pool[sel.index].tolist() == man["indices"]
    assert isinstance(feats, FeatureResult)


def test_kernel_options_are_required_and_checked(digits_teacher, tmp_path):
    model, tr, _ = digits_teacher
    with pytest.raises(DNTKError, match="projector"):
        distill_dataset("kernel-greedy", model, tr, 2, tmp_path / "a", progress=False)
    with pytest.raises(DNTKError, match="kernel_options"):
        distill_dataset("random", model, tr, 2, tmp_path / "b", kernel_options={"pool_factor": 2})
    with pytest.raises(DNTKError, match="pool_factor"):
        distill_dataset("kernel-herding", model, tr, 2, tmp_path / "c", progress=False,
                        kernel_options={"projector": make_projector("tensorsketch", k=8), "pool_factor": 0})


def test_cli_distill_and_run_choose_the_same_images_and_report_the_cost(tmp_path):
    from dntk.cli import main

    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["distill", "--distill", "kernel-greedy", "--ipc", "3", "--pool-factor", "2", "--k", "128",
                 "--ridge", "0.001", "--epochs", "2", "--out", str(a), "--quiet"]) == 0
    man = json.loads((a / "distill-kernel-greedy-ipc3-seed0" / "manifest.json").read_text())
    assert man["jacobians"]["pool_images"] == 60 and man["settings"]["projector"]["k"] == 128
    assert (man["settings"]["ridge"], man["settings"]["targets"]) == (0.001, "logits")   # the kernel model's
    assert main(["run", "--distill", "kernel-greedy", "--ipc", "3", "--pool-factor", "2", "--k", "128",
                 "--ridge", "0.001", "--epochs", "2", "--n-test", "30", "--out", str(b), "--quiet"]) == 0
    res = json.loads((b / "results.json").read_text())
    man_b = json.loads((b / "distill-kernel-greedy-ipc3-seed0" / "manifest.json").read_text())
    assert man_b["indices"] == man["indices"]       # same teacher recipe, seed and projector → same choice
    d = res["distillation"]
    assert (d["method"], d["m"], d["stage1_jacobian_images"], d["stage1_per_logit_gradients"]) == \
        ("kernel-greedy", 30, 60, 600)
    assert d["jacobians_saved_with_stage1"] == pytest.approx(res["counts"]["n_real"] / (60 + 30))
    # a second run reuses the stored pool features: no Jacobian is computed again
    assert main(["run", "--distill", "kernel-greedy", "--ipc", "3", "--pool-factor", "2", "--k", "128",
                 "--ridge", "0.001", "--epochs", "2", "--n-test", "30", "--out", str(b), "--quiet"]) == 0
    again = json.loads((b / "distill-kernel-greedy-ipc3-seed0" / "manifest.json").read_text())
    assert again["jacobians"]["computed_here_images"] == 0 and again["indices"] == man["indices"]
