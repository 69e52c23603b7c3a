"""#28: an honest teacher (its epoch chosen on held-out training data, never on the test split), files that
are torn or empty, and mistakes refused before any training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import dntk
from dntk.cli import main
from dntk.errors import DNTKError
from dntk.training import validation_split

from test_reliability import _folder

RUN = ["run", "--quiet", "--epochs", "4", "--m", "60", "--n-test", "60", "--k", "128"]


def _results(out) -> dict:
    return json.loads((Path(out) / "results.json").read_text())


# --- case 4: the teacher's epoch -------------------------------------------------------------------------
def test_validation_split_is_stratified_seeded_and_disjoint():
    labels = torch.tensor([0] * 20 + [1] * 7 + [2] * 1 + [3] * 2)
    fit, val = validation_split(labels, 0.25, seed=3)
    assert sorted(torch.cat([fit, val]).tolist()) == list(range(30))                 # a partition
    per_class = torch.bincount(labels[val], minlength=4).tolist()
    assert per_class == [5, 2, 0, 1]      # round(0.25·n_c), at least 1, at most n_c − 1, none of a 1-sample class
    again, other = validation_split(labels, 0.25, seed=3)[1], validation_split(labels, 0.25, seed=4)[1]
    assert torch.equal(again, val) and not torch.equal(other, val)
    assert validation_split(labels, 0.0, seed=0)[1].numel() == 0
    for bad in (0.6, -0.1, True, "0.1"):
        with pytest.raises(DNTKError, match="validation fraction"):
            validation_split(labels, bad, seed=0)


def test_the_teacher_never_sees_the_test_split(tmp_path, monkeypatch):
    """Case 4: the best epoch was chosen by accuracy on the test split, then reported as test accuracy. Every
    evaluation during teacher training must be on the held-out part of the training data, and the recorded
    validation accuracy must be that part's accuracy of the kept weights."""
    import dntk.training.loop as loop

    sizes = []
    real = loop.evaluate

    def spy(model, data, *a, **k):
        sizes.append(len(data))
        return real(model, data, *a, **k)

    monkeypatch.setattr(loop, "evaluate", spy)
    out = tmp_path / "o"
    assert main([*RUN, "--out", str(out)]) == 0
    teacher = _results(out)["teacher"]
    v = teacher["validation"]
    train, test = dntk.data.load_configured(dntk.RunConfig.from_options(n_test=60).resolved().data, progress=False)
    counts = torch.bincount(train.labels).tolist()
    assert v["n_val"] == sum(round(0.1 * n) for n in counts) and v["n_train"] + v["n_val"] == len(train)
    assert sizes == [v["n_val"]] * 4                          # one evaluation per epoch, all on the held-out part
    history = json.loads((Path(teacher["source"]).parent / "history.json").read_text())
    accs = [h["val_accuracy"] for h in history]
    assert teacher["best_epoch"] == v["epoch"] == 1 + int(np.argmax(accs))           # the first best epoch
    _, held = validation_split(train.labels, 0.1, 0)
    model = dntk.training.build_network(dntk.config.TeacherConfig(model="small_cnn"), "digits", 8, train)
    model.load_state_dict(torch.load(teacher["source"])["model"])
    assert real(model, train.subset(held))[0] == v["val_accuracy"] == max(accs)
    assert real(model, test)[0] == teacher["test_accuracy"]


def test_no_validation_keeps_the_last_epoch_and_students_are_not_selected_on_test(tmp_path, monkeypatch):
    import dntk.training.loop as loop

    out = tmp_path / "o"
    assert main([*RUN, "--val-fraction", "0", "--out", str(out)]) == 0
    v = _results(out)["teacher"]["validation"]
    assert v["n_val"] == 0 and v["selection"] == "last epoch" and v["epoch"] == 4 and v["val_accuracy"] is None
    calls = []
    real = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    out2 = tmp_path / "s"
    assert main([*RUN, "--distill", "random", "--ipc", "3", "--base-model", "student", "--student-epochs", "3",
                 "--out", str(out2)]) == 0
    # the teacher: 4 evaluations on its held-out part; the student: none while training (kept: its final epoch)
    assert len(calls) == 4
    (student,) = out2.glob("student-*")
    assert [h["val_accuracy"] for h in json.loads((student / "history.json").read_text())] == [None] * 3
    assert torch.load(student / "best.pt")["epoch"] == 3


# --- case 6: torn, empty and misplaced files ---------------------------------------------------------------
def test_torn_or_empty_checkpoints_and_history_heal(tmp_path):
    out = tmp_path / "o"
    assert main([*RUN, "--threads", "2", "--out", str(out)]) == 0
    first = _results(out)
    folder = Path(first["teacher"]["source"]).parent
    (folder / "last.pt").write_bytes(b"")                              # zero-byte
    best = folder / "best.pt"
    best.write_bytes(best.read_bytes()[: best.stat().st_size // 2])    # torn
    with pytest.warns(RuntimeWarning, match="last.pt is unreadable"):
        assert main([*RUN, "--threads", "2", "--out", str(out)]) == 0
    again = _results(out)
    assert again["teacher"]["checksum"] == first["teacher"]["checksum"]   # retrained, the same teacher
    assert again["kernel_model"] == first["kernel_model"]
    (folder / "history.json").write_text('[{"epoch": 1, "train_')         # torn
    with pytest.warns(RuntimeWarning, match="history.json is unreadable"):
        assert main([*RUN, "--threads", "2", "--out", str(out)]) == 0
    assert len(json.loads((folder / "history.json").read_text())) == 4    # healed from last.pt
    assert _results(out)["teacher"]["train_seconds"] == again["teacher"]["train_seconds"]


def test_a_torn_image_cache_is_decoded_again(tmp_path):
    from dntk.data.sources import image_folder

    data = _folder(tmp_path / "data")
    first = image_folder(data, image_size=16, cache_dir=tmp_path / "cache")
    (cache,) = (tmp_path / "cache").iterdir()
    cache.write_bytes(b"")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        again = image_folder(data, image_size=16, cache_dir=tmp_path / "cache")
    assert torch.equal(again.images, first.images) and cache.stat().st_size > 0
    assert torch.equal(dntk.store.cached(tmp_path / "c.pt", lambda: torch.ones(2)), torch.ones(2))
    (tmp_path / "c.pt").write_bytes(b"PK\x03\x04 torn")
    with pytest.warns(RuntimeWarning, match="recomputing"):
        assert torch.equal(dntk.store.cached(tmp_path / "c.pt", lambda: torch.zeros(2)), torch.zeros(2))


def test_atomic_writes_refuse_a_folder_in_the_way(tmp_path):
    (tmp_path / "x.json").mkdir()
    with pytest.raises(DNTKError, match="x.json is a folder"):
        dntk.store.atomic_json({"a": 1}, tmp_path / "x.json")
    (tmp_path / "file").write_text("")
    with pytest.raises(DNTKError, match="cannot write"):
        dntk.store.atomic_save({"a": 1}, tmp_path / "file" / "y.pt")
    dntk.store.atomic_json({"a": 1}, tmp_path / "ok.json")
    assert json.loads((tmp_path / "ok.json").read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


# --- mechanism 7: everything checkable is checked before the teacher trains -----------------------------------
def _refused(capsys, args, says):
    assert main(args) == 1
    err = capsys.readouterr().err
    assert says in err, err


def test_mistakes_are_refused_before_any_training(tmp_path, capsys):
    (tmp_path / "a-file").write_text("")
    _refused(capsys, [*RUN, "--out", str(tmp_path / "a-file")], "is a file; name a folder")
    _refused(capsys, [*RUN, "--out", str(tmp_path / "a-file" / "sub")], "cannot be written")
    (tmp_path / "o" / "results.json").mkdir(parents=True)
    _refused(capsys, [*RUN, "--out", str(tmp_path / "o")], "results.json is a folder")
    _refused(capsys, [*RUN, "--image-size", "16", "--out", str(tmp_path / "img")], "the digits are 8 × 8 pixels")
    _refused(capsys, [*RUN, "--resize", "16", "--out", str(tmp_path / "img")], "are not resized; drop --resize")
    _refused(capsys, [*RUN, "--train-batch-size", "1", "--out", str(tmp_path / "img")], "batch size 1")
    _refused(capsys, [*RUN, "--device", "foo", "--out", str(tmp_path / "d")], "--device 'foo' is not a device name")
    if not torch.cuda.is_available():
        _refused(capsys, [*RUN, "--device", "cuda", "--out", str(tmp_path / "d")], "no usable CUDA GPU")
    out = tmp_path / "o2"
    _refused(capsys, [*RUN, "--k", "100000", "--out", str(out)], "--k 100000 is larger than the model's P = 28,842")
    _refused(capsys, [*RUN, "--distill", "random", "--ipc", "400", "--out", str(out)], "ipc=400 is larger than")
    assert [p.name for p in out.iterdir() if not p.name.startswith(".")] == []   # nothing trained, nothing written
    assert not (tmp_path / "d").exists()


def test_class_folders_without_images_or_a_single_class_are_named(tmp_path, capsys):
    data = _folder(tmp_path / "data")
    (data / "train" / "c2").mkdir()
    (data / "val" / "c2").mkdir()
    (data / "val" / "c2" / "0.png").write_bytes((data / "val" / "c0" / "0.png").read_bytes())
    base = ["run", "--dataset", "folder", "--data-root", str(data), "--model", "small_cnn", "--quiet",
            "--image-size", "16", "--out", str(tmp_path / "o")]
    _refused(capsys, base, f"class folder {data / 'train' / 'c2'} holds no image files")
    one = _folder(tmp_path / "one")
    for split in ("train", "val"):
        for f in (one / split / "c1").iterdir():
            f.unlink()
        (one / split / "c1").rmdir()
    _refused(capsys, [*base[:4], str(one), *base[5:]], "has one class folder (c0)")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").glob("teacher*"))


def test_reproduce_refuses_its_own_flags_as_overrides(tmp_path, capsys, sample_root):
    from dntk.pipeline.reproduce import ReproduceConfig

    for name in ("seed", "out", "device", "dataset", "data_root", "progress"):
        _refused(capsys, ["reproduce", "--data-root", str(sample_root), "--out", str(tmp_path / "r"),
                          "--set", f"{name}=1"], f"{name} is a flag of dntk reproduce itself")
    with pytest.raises(DNTKError, match=r"seed is a setting of dntk reproduce itself, not an override: pass --seed"):
        ReproduceConfig(data_root=str(sample_root), overrides={"seed": 1}).check()
    assert not (tmp_path / "r").exists()
    # more images per class than the data holds: refused before the teacher trains (only the decoded images, which
    # the count needs, are cached)
    _refused(capsys, ["reproduce", "--data-root", str(sample_root), "--out", str(tmp_path / "r"), "--set", "ipc=5000"],
             "ipc=5000 is larger than")
    assert [p.relative_to(tmp_path / "r").parts[0] for p in (tmp_path / "r").rglob("*.pt")] == ["cache", "cache"]


# --- mechanism 1: stage results keyed by what they depend on ---------------------------------------------
def test_wmdd_classes_are_never_reused_for_other_real_images(tmp_path):
    """A WMDD folder was reused whenever the settings and the teacher matched, whatever the real images it
    starts from (a --checkpoint teacher with another data set): now keyed by the images' content too."""
    from dntk.distill.wmdd import WMDDConfig, data_key, wmdd
    from dntk.store import model_checksum

    from conftest import randomize_bn, small_cnn_bn

    torch.manual_seed(0)
    teacher = randomize_bn(small_cnn_bn(C=3))
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (12, 3, 8, 8), dtype=torch.uint8, generator=g)
    data = dntk.data.ImageSet(images, torch.arange(3).repeat_interleave(4), ["a", "b", "c"])
    cfg = WMDDConfig(ipc=2, iterations=3, barycenter_iterations=5)
    ck = model_checksum(teacher)
    first = wmdd(teacher, data, cfg, tmp_path / "w", progress=False, teacher_checksum=ck)
    stamp = [p.stat().st_mtime_ns for p in sorted((tmp_path / "w" / "classes").iterdir())]
    again = wmdd(teacher, data, cfg, tmp_path / "w", progress=False, teacher_checksum=ck)     # reused
    assert torch.equal(again.images, first.images)
    assert stamp == [p.stat().st_mtime_ns for p in sorted((tmp_path / "w" / "classes").iterdir())]
    edited = images.clone()
    edited[0] = 255 - edited[0]                         # one real image of class a changed
    other = wmdd(teacher, dntk.data.ImageSet(edited, data.labels, data.classes), cfg, tmp_path / "w",
                 progress=False, teacher_checksum=ck)
    assert stamp != [p.stat().st_mtime_ns for p in sorted((tmp_path / "w" / "classes").iterdir())]   # recomputed
    assert json.loads((tmp_path / "w" / "manifest.json").read_text())["data"] == data_key(
        dntk.data.ImageSet(edited, data.labels, data.classes))
    assert len(other) == 6


def test_a_garbage_or_edited_store_manifest_is_written_again(tmp_path):
    """Case 6: a garbage manifest.json was a raw JSONDecodeError in `run`; an edited shard range was refused
    with "rerun the extraction", which never fixed it."""
    out = tmp_path / "o"
    args = [*RUN, "--epochs", "1", "--feature-chunk", "16", "--out", str(out)]
    assert main(args) == 0
    first = _results(out)
    (store,) = out.glob("features-train-*")
    (store / "manifest.json").write_text("{ not json")
    with pytest.warns(RuntimeWarning, match="manifest.json is unreadable"):
        assert main(args) == 0
    assert _results(out)["kernel_model"] == first["kernel_model"]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")                 # an intact manifest is not written again (no false alarm)
        assert main(args) == 0
    manifest = json.loads((store / "manifest.json").read_text())
    manifest["shards"][1] = [5, 9]
    (store / "manifest.json").write_text(json.dumps(manifest))
    with pytest.warns(RuntimeWarning, match="shard ranges that do not follow"):
        assert main(args) == 0
    assert _results(out)["kernel_model"] == first["kernel_model"]
    assert json.loads((store / "manifest.json").read_text())["shards"][1] == [16, 32]
