"""Stage 1: barycenters, BN statistics, the WMDD objective, k-center, the on-disk format."""

import itertools
import math

import pytest
import torch
import torch.nn as nn

from dntk import DNTKError
from dntk.data import digits
from dntk.distill import (WMDDConfig, barycenter, bn_layers, class_bn_statistics, covering_radius, kcenter_greedy,
                          load_distilled, select_real, wasserstein2, wmdd)
from dntk.distill.wmdd import class_targets, optimise_group, synthesize_class
from dntk.models import SmallCNN
from dntk.training import TrainConfig, train


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    tr, te = digits("train"), digits("val")
    model = SmallCNN(1, 10)
    train(model, tr, te, TrainConfig(epochs=3, augment="shift"), tmp_path_factory.mktemp("t"), progress=False)
    return model.eval(), tr, te


def test_barycenter_beats_random_points():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 6, generator=g) * 4
    X = centres.repeat_interleave(40, 0) + torch.randn(200, 6, generator=g)
    Z = barycenter(X, 10, seed=0)
    w_bary = wasserstein2(X, Z)
    w_rand = [wasserstein2(X, X[torch.randperm(200, generator=g)[:10]]) for _ in range(5)]
    assert Z.shape == (10, 6)
    assert w_bary < min(w_rand)


def test_class_bn_statistics_equal_direct_computation(digits_teacher):
    model, tr, _ = digits_teacher
    x, _ = tr.tensors(torch.nonzero(tr.labels == 3).flatten())
    stats = class_bn_statistics(model, x, batch=7)   # accumulated over uneven batches
    seen = []
    hs = [l.register_forward_hook(lambda m, i, o: seen.append(i[0])) for l in bn_layers(model)]
    with torch.no_grad():
        model(x)
    for h in hs:
        h.remove()
    assert len(stats) == len(seen) == 3
    for (mu, var), inp in zip(stats, seen):
        assert torch.allclose(mu, inp.mean((0, 2, 3)), atol=1e-5)
        assert torch.allclose(var, inp.var((0, 2, 3), unbiased=False), atol=1e-5)


def test_wmdd_iterations_lower_the_objective(digits_teacher):
    model, tr, _ = digits_teacher
    for p in model.parameters():
        p.requires_grad_(False)
    x, _ = tr.tensors(torch.nonzero(tr.labels == 5).flatten())
    cfg = WMDDConfig(ipc=4, iterations=20, lr=0.05, jitter=False, bn_weight=0.1)
    _, rec = synthesize_class(model, x, 5, cfg, bn_layers(model))
    for p in model.parameters():
        p.requires_grad_(True)
    assert rec["final_loss"]["total"] < rec["initial_loss"]["total"]


def test_grouped_optimisation_equals_per_class_optimisation(digits_teacher):
    """Several classes in one batch must give each class the images it gets alone: the BN moments,
    feature and CE terms are per class, so the summed loss separates (float64, no jitter)."""
    model, tr, _ = digits_teacher
    model = SmallCNN(1, 10).double().eval()
    model.load_state_dict({k: v.double() for k, v in digits_teacher[0].state_dict().items()})
    for p in model.parameters():
        p.requires_grad_(False)
    cfg = WMDDConfig(ipc=3, iterations=6, lr=0.05, jitter=False, bn_weight=0.5)
    layers = bn_layers(model)
    targets, inits = [], []
    for c in (2, 7):
        real = tr.tensors(torch.nonzero(tr.labels == c).flatten())[0].double()
        t = class_targets(model, real, c, cfg, layers)
        targets.append({**t, "support": t["support"].double(), "stats": [(m.double(), v.double()) for m, v in t["stats"]]})
        inits.append(real[t["init_indices"]])
    joint, recs = optimise_group(model, torch.cat(inits), [2, 7], torch.stack([t["support"] for t in targets]),
                                 [t["stats"] for t in targets], cfg, layers)
    for i, c in enumerate((2, 7)):
        alone, rec = optimise_group(model, inits[i], [c], targets[i]["support"][None], [targets[i]["stats"]], cfg, layers)
        assert not torch.equal(alone, inits[i])                      # the images did move
        assert torch.allclose(joint[3 * i:3 * i + 3], alone, atol=1e-9)
        assert recs[i]["final_loss"]["total"] == pytest.approx(rec[0]["final_loss"]["total"], rel=1e-9)


def test_wmdd_grouped_run_writes_the_same_format(digits_teacher, tmp_path):
    model, tr, _ = digits_teacher
    ds = wmdd(model, tr, WMDDConfig(ipc=2, iterations=2, classes_per_step=4), tmp_path, progress=False)
    assert ds.class_counts() == [2] * 10 and torch.equal(ds.labels, torch.arange(10).repeat_interleave(2))
    import json
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["settings"]["classes_per_step"] == 4 and manifest["seconds"] > 0
    with pytest.raises(DNTKError, match="classes_per_step"):
        wmdd(model, tr, WMDDConfig(ipc=2, iterations=2, classes_per_step=0), tmp_path / "bad", progress=False)


def test_wmdd_outputs_reload_bit_identically_and_resume(digits_teacher, tmp_path):
    model, tr, _ = digits_teacher
    ds = wmdd(model, tr, WMDDConfig(ipc=2, iterations=2), tmp_path, progress=False)
    back = load_distilled(tmp_path)
    assert torch.equal(back.images, ds.images) and torch.equal(back.labels, ds.labels)
    assert back.class_counts() == [2] * 10 and back.method == "wmdd"
    assert (tmp_path / "manifest.json").exists() and len(list(tmp_path.glob("grid-*.png"))) == 10
    stamps = [p.stat().st_mtime_ns for p in sorted((tmp_path / "classes").glob("*.pt"))]
    again = wmdd(model, tr, WMDDConfig(ipc=2, iterations=2), tmp_path, progress=False)
    assert stamps == [p.stat().st_mtime_ns for p in sorted((tmp_path / "classes").glob("*.pt"))]
    assert torch.equal(again.images, ds.images)


def test_kcenter_is_a_valid_greedy_cover():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(120, 5, generator=g)
    picks = kcenter_greedy(X, 12, first=7)
    assert len(set(picks)) == 12 and picks[0] == 7
    for t in range(1, 12):  # each pick is the point farthest from the ones before it
        d = torch.cdist(X.double(), X[picks[:t]].double()).min(1).values
        assert picks[t] == int(torch.argmax(d))
    # the picks equal a naive O(n²·m) farthest-point greedy in plain Python, and covering_radius
    # equals the radius of those centres computed the same way
    pts = X.double().tolist()
    dist = lambda a, b: math.sqrt(sum((u - v) ** 2 for u, v in zip(a, b)))
    naive = [7]
    while len(naive) < 12:
        gaps = [min(dist(p, pts[j]) for j in naive) for p in pts]
        naive.append(max(range(len(pts)), key=lambda i: (gaps[i], -i)))  # first index among ties, as argmax
    assert picks == naive
    radius = max(min(dist(p, pts[j]) for j in naive) for p in pts)
    assert covering_radius(X, picks) == pytest.approx(radius, rel=1e-12)


def test_kcenter_hand_example_and_optimum():
    """1-D points 0, 1, 2, 10, 11, 20 from 0: farthest is 20, then 10; radius 2 (point 2 to 0).
    On a tiny random set the greedy radius is within 2× the optimum found by trying every subset."""
    X = torch.tensor([[0.0], [1.0], [2.0], [10.0], [11.0], [20.0]])
    assert kcenter_greedy(X, 3, first=0) == [0, 5, 3]
    assert covering_radius(X, [0, 5, 3]) == pytest.approx(2.0)
    g = torch.Generator().manual_seed(3)
    Y = torch.randn(10, 2, generator=g)
    greedy = covering_radius(Y, kcenter_greedy(Y, 3, first=4))
    optimum = min(covering_radius(Y, list(c)) for c in itertools.combinations(range(10), 3))
    assert optimum <= greedy <= 2 * optimum


def test_random_and_kcenter_subsets(digits_teacher, tmp_path):
    model, tr, _ = digits_teacher
    r = select_real(tr, 3, "random", seed=0, out_dir=tmp_path / "r")
    k = select_real(tr, 3, "kcenter", teacher=model, seed=0)
    assert r.class_counts() == [3] * 10 and k.class_counts() == [3] * 10
    assert torch.equal(load_distilled(tmp_path / "r").images, r.images)


def test_bad_input(digits_teacher, tmp_path):
    model, tr, te = digits_teacher
    with pytest.raises(DNTKError, match="ipc=500 is larger than the image count"):
        select_real(tr, 500, "random")
    only_some = tr.subset(torch.nonzero(tr.labels < 9).flatten())
    with pytest.raises(DNTKError, match=r"classes \['9'\] have no images"):
        select_real(only_some, 2, "random")
    no_bn = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10))
    with pytest.warns(RuntimeWarning, match="no BatchNorm layers"):
        wmdd(no_bn, tr, WMDDConfig(ipc=1, iterations=1), tmp_path / "nobn", progress=False)
    ds = select_real(tr, 1, "random")
    other = digits("val")
    other.classes = [f"c{i}" for i in range(10)]
    with pytest.raises(DNTKError, match="distilled set has 10 classes"):
        ds.check_compatible(other)
    with pytest.raises(DNTKError, match="no distilled set"):
        load_distilled(tmp_path / "missing")


def test_student_on_distilled_images_with_soft_labels(digits_teacher, tmp_path):
    model, tr, te = digits_teacher
    ds = select_real(tr, 20, "random", seed=0)
    with torch.no_grad():
        soft = model(ds.images)
    student = SmallCNN(1, 10)
    res = train(student, ds, te, TrainConfig(epochs=30, batch_size=32, optimizer="adamw", weight_decay=0.01,
                                             augment="shift", eval_every=10), tmp_path, soft_labels=soft,
                progress=False)
    assert res.best_accuracy > 0.5   # 200 images with the teacher's soft labels: far above chance (0.1)


def test_student_relabelled_by_the_teacher(digits_teacher, tmp_path):
    """Without augmentation, relabelling every batch with the teacher is the same as fixed soft labels
    (identical weights); with augmentation it still trains a useful student; both at once is refused."""
    model, tr, te = digits_teacher
    ds = select_real(tr, 20, "random", seed=0)
    with torch.no_grad():
        soft = model.eval()(ds.images)
    cfg = TrainConfig(epochs=3, batch_size=32, optimizer="adamw", augment="none", eval_every=3)
    fixed, relabelled = SmallCNN(1, 10), SmallCNN(1, 10)
    relabelled.load_state_dict(fixed.state_dict())
    train(fixed, ds, te, cfg, tmp_path / "fixed", soft_labels=soft, progress=False)
    train(relabelled, ds, te, cfg, tmp_path / "relabel", teacher=model, progress=False)
    for a, b in zip(fixed.state_dict().values(), relabelled.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-5)
    aug = SmallCNN(1, 10)
    res = train(aug, ds, te, TrainConfig(epochs=30, batch_size=32, optimizer="adamw", weight_decay=0.01,
                                         augment="shift", eval_every=10), tmp_path / "aug", teacher=model,
                progress=False)
    assert res.best_accuracy > 0.5
    with pytest.raises(DNTKError, match="not both"):
        train(SmallCNN(1, 10), ds, te, cfg, tmp_path / "both", soft_labels=soft, teacher=model, progress=False)


def test_resume_check_knows_the_label_source_and_old_checkpoints():
    import json
    from dataclasses import asdict

    from dntk.training import same_config

    cfg = TrainConfig(epochs=3)
    old = {k: v for k, v in asdict(cfg).items() if k != "eval_every"}     # written before eval_every existed
    assert same_config(json.dumps(old), cfg)
    assert not same_config(json.dumps(old), cfg, relabel_teacher=True)
    assert same_config(json.dumps({**old, "relabel_teacher": True}), cfg, relabel_teacher=True)
    assert not same_config(json.dumps({**old, "epochs": 4}), cfg)


def test_wmdd_restores_the_teachers_trainable_flags(digits_teacher, tmp_path):
    model, tr, _ = digits_teacher
    params = list(model.parameters())
    params[0].requires_grad_(False)
    try:
        wmdd(model, tr, WMDDConfig(ipc=1, iterations=1, classes_per_step=10), tmp_path, progress=False)
        assert [p.requires_grad for p in params] == [False] + [True] * (len(params) - 1)
    finally:
        params[0].requires_grad_(True)
