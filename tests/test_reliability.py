"""#28, the cases fixed so far: results that used to be silently wrong with exit code 0."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import dntk
from dntk.cli import main
from dntk.errors import DNTKError

from conftest import rel, randomize_bn, small_cnn_bn


def test_inference_mode_gives_the_same_kernels_not_zeros():
    """Case 8: under torch.inference_mode() the engine used to return all-zero features and kernels."""
    torch.manual_seed(0)
    m = randomize_bn(small_cnn_bn()).double()
    x = torch.randn(5, 3, 8, 8, dtype=torch.float64)
    K = dntk.empirical_ntk(m, x)
    F = dntk.gradient_features(m, x, "identity", progress=False).features
    assert float(K.norm()) > 0
    with torch.inference_mode():
        xi = x.clone()   # an inference tensor
        assert rel(dntk.empirical_ntk(m, xi), K) < 1e-12
        assert rel(dntk.gradient_features(m, xi, "identity", progress=False).features, F) < 1e-12
        assert rel(dntk.features.sliced_class_kernels(m, xi)[0], K) < 1e-12
        made_here = small_cnn_bn()      # parameters created under inference_mode cannot be differentiated
    with pytest.raises(DNTKError, match="created under torch.inference_mode"):
        with torch.inference_mode():
            dntk.gradient_features(made_here, torch.randn(2, 3, 8, 8), "identity", progress=False)


def _flip(path, offset=-64, n=64):
    data = bytearray(path.read_bytes())
    for j in range(n):
        data[offset + j] ^= 0xFF
    path.write_bytes(bytes(data))


def _finished_store(tmp_path):
    """A small CNN's sjlt features of 24 inputs in a finished store of 3 shards: (model, X, projector, store)."""
    torch.manual_seed(0)
    m = randomize_bn(small_cnn_bn())
    X = torch.randn(24, 3, 8, 8)
    proj = dntk.projection.make("sjlt", k=64, seed=0)
    store = dntk.store.FeatureStore(tmp_path / "s", shard=8)
    store.extract(m, X, proj, progress=False)
    return m, X, proj, store


def test_a_corrupted_or_swapped_shard_is_never_used(tmp_path):
    """Case 1: flipped bytes inside a finished shard (header intact) were read back as features."""
    m, X, proj, store = _finished_store(tmp_path)
    good = store.read().features.clone()
    _flip(tmp_path / "s" / "shard-000001.features.npy")
    fresh = dntk.store.FeatureStore(tmp_path / "s", shard=8)
    assert fresh.missing() == [1]
    with pytest.raises(DNTKError, match="do not match their checksums"):
        fresh.read()
    with pytest.warns(RuntimeWarning, match="shard 1 does not match its completion record"):
        assert fresh.extract(m, X, proj, progress=False) == [1]       # recomputed alone
    assert torch.equal(fresh.read().features, good)
    # two shards' logits swapped (same shapes): both fail their checksums and are recomputed
    a, b = tmp_path / "s" / "shard-000000.logits.npy", tmp_path / "s" / "shard-000002.logits.npy"
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)
    again = dntk.store.FeatureStore(tmp_path / "s", shard=8)
    assert again.missing() == [0, 2]
    with pytest.warns(RuntimeWarning):
        assert again.extract(m, X, proj, progress=False) == [0, 2]
    assert torch.equal(again.read().logits, store.read().logits)


@pytest.mark.parametrize("what", ["features", "logits"])
def test_a_zero_byte_shard_is_named_and_recomputed(tmp_path, what):
    """Case 6: a zero-byte shard array behind a valid record (what a power loss before the data reached the disk
    leaves) raised numpy's EOFError on every rerun. Now verify() reports it, read() refuses it naming the file, and
    extraction recomputes it with a warning, to the same features."""
    m, X, proj, store = _finished_store(tmp_path)
    good = store.read()
    (tmp_path / "s" / f"shard-000001.{what}.npy").write_bytes(b"")
    fresh = dntk.store.FeatureStore(tmp_path / "s", shard=8)
    report = fresh.verify()
    assert not report["complete"] and [c[:2] for c in report["corrupt"]] == [(1, f"shard-000001.{what}.npy")]
    assert fresh.missing() == [1]
    with pytest.raises(DNTKError, match=f"shard-000001.{what}.npy: missing or unreadable"):
        fresh.read()
    with pytest.warns(RuntimeWarning, match="shard 1 does not match its completion record"):
        assert fresh.extract(m, X, proj, progress=False) == [1]
    again = fresh.read()
    assert torch.equal(again.features, good.features) and torch.equal(again.logits, good.logits)


def test_dntk_run_recomputes_a_corrupted_shard(tmp_path, capsys):
    """Case 1 end to end: rerunning the same command after a flip reports the same numbers."""
    out = tmp_path / "run"
    args = ["run", "--m", "60", "--n-test", "40", "--k", "128", "--feature-chunk", "16", "--epochs", "2", "--quiet",
            "--out", str(out)]
    assert main(args) == 0
    before = json.loads((out / "results.json").read_text())["kernel_model"]
    shard = sorted(out.glob("features-train-*/shard-000002.features.npy"))[0]
    _flip(shard, offset=-200, n=64)
    with pytest.warns(RuntimeWarning, match="recomputing it"):
        assert main(args) == 0
    after = json.loads((out / "results.json").read_text())["kernel_model"]
    assert after == before


def test_a_second_job_on_one_out_is_refused_and_a_dead_holder_is_taken_over(tmp_path, capsys):
    """Case 3: two runs in one --out used to mix (results.json of one run, teacher of the other)."""
    import subprocess
    import sys
    import time

    out = tmp_path / "w"
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from dntk.lock import hold\n"
                               f"with hold({str(out)!r}):\n    print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["run", "--m", "20", "--epochs", "1", "--quiet", "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert f"is in use by another dntk job (pid {holder.pid}" in err
        assert main(["train", "--epochs", "1", "--quiet", "--out", str(out)]) == 1
        assert not (out / "results.json").exists() and not (out / "teacher").exists()
    finally:
        holder.kill()
        holder.wait()
    # the kernel released the dead holder's lock: the next job takes it over
    assert main(["run", "--m", "20", "--n-test", "20", "--k", "64", "--epochs", "1", "--quiet", "--out", str(out)]) == 0
    from dntk.lock import hold
    with hold(out), hold(out):   # re-entrant within a process
        pass


def test_metrics_and_subset_inputs():
    """Case 9: [n, 1] labels broadcast, NaN predictions counted as hits, boolean masks read as 0/1."""
    from dntk import metrics

    logits = torch.tensor([[0.1, 2.0], [3.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([1, 0, 1])
    assert metrics.accuracy(logits, y) == 1.0
    assert metrics.accuracy(logits, y[:, None]) == 1.0          # was 1/3 through broadcasting
    assert metrics.accuracy(logits.numpy(), y.numpy()) == 1.0
    nan = logits.clone()
    nan[0, 0] = float("nan")
    assert metrics.accuracy(nan, y) == pytest.approx(2 / 3)      # a NaN row is a miss
    assert metrics.fidelity(nan, logits) == pytest.approx(2 / 3)
    assert metrics.fidelity(nan, nan) == pytest.approx(2 / 3)
    with pytest.raises(DNTKError, match="one-hot labels pass labels.argmax"):
        metrics.accuracy(logits, torch.nn.functional.one_hot(y))
    with pytest.raises(DNTKError, match=r"must be \[n ≥ 1, C\]"):
        metrics.fidelity(logits[:, 0], logits[:, 0])
    r = dntk.FeatureResult(torch.randn(2, 4, 3), torch.randn(4, 2), torch.arange(4), [0, 1], None)
    mask = torch.tensor([True, False, True, False])
    sub = r.subset(mask)
    assert torch.equal(sub.features, r.features[:, [0, 2]]) and torch.equal(sub.labels, torch.tensor([0, 2]))
    with pytest.raises(DNTKError, match="one entry per sample"):
        r.subset(torch.tensor([True, False]))


@pytest.mark.parametrize("ridge", [1e-3, 0.1])
def test_hybrid_reproduces_the_all_m_regression_at_every_s(ridge):
    """Case 10: hybrid was 8e-4 to 0.14 off the all-m model at s > 1 (non-orthonormal directions);
    checked on the predictions, against a dense solve of the all-m KRR."""
    from dntk.gradient_distillation.target import hybrid

    torch.manual_seed(0)
    C, m, k, n = 3, 40, 30, 15
    F = torch.randn(C, m, k, dtype=torch.float64)
    Ft = torch.randn(C, n, k, dtype=torch.float64)
    Y = torch.randn(m, C, dtype=torch.float64)
    for s in (1, 2, 5, 9):
        dg = hybrid(F, Y, s, ridge=ridge, seed=0, n_clusters=3)
        for c in range(C):
            U = dg.coefficients[c]
            assert torch.allclose(U.T @ U, torch.eye(U.shape[1], dtype=torch.float64), atol=1e-12)
            K = F[c] @ F[c].T
            full = Ft[c] @ F[c].T @ torch.linalg.solve(K + ridge * torch.eye(m, dtype=torch.float64), Y[:, c])
            phi, yhat = dg.features[c], dg.targets[c]                    # [s, k], [s]
            syn = Ft[c] @ phi.T @ torch.linalg.solve(phi @ phi.T + ridge * torch.eye(phi.shape[0], dtype=torch.float64),
                                                     yhat)
            assert float((syn - full).norm() / full.norm()) < 1e-9, (s, c)


def _folder(root, size=20, seed=0):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, n in (("train", 6), ("val", 3)):
        for c in range(2):
            d = root / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = rng.integers(0, 90, (size, size, 3))
                a[..., c] += 120
                Image.fromarray(a.astype(np.uint8)).save(d / f"{i}.png")
    return root


def test_a_teacher_is_never_reused_for_other_data(tmp_path):
    """Case 2: OUT/teacher was reused whatever the data (another --image-size kept the old teacher)."""
    data = _folder(tmp_path / "data")
    out = tmp_path / "out"
    base = ["run", "--dataset", "folder", "--data-root", str(data), "--model", "small_cnn", "--epochs", "1",
            "--train-batch-size", "4",
            "--m", "6", "--k", "32", "--quiet", "--out", str(out)]
    assert main(base + ["--image-size", "16"]) == 0
    first = json.loads((out / "results.json").read_text())["teacher"]
    assert first["source"] == str(out / "teacher" / "best.pt")
    assert main(base + ["--image-size", "16"]) == 0                     # the same data: reused, not retrained
    assert json.loads((out / "results.json").read_text())["teacher"]["checksum"] == first["checksum"]
    assert main(base + ["--image-size", "24"]) == 0
    second = json.loads((out / "results.json").read_text())["teacher"]
    assert second["source"] != first["source"] and second["best_epoch"] == 1
    # an edited training image (same file name and count) is another data set too
    from PIL import Image

    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(data / "train" / "c0" / "0.png")
    assert main(base + ["--image-size", "16"]) == 0
    third = json.loads((out / "results.json").read_text())["teacher"]
    assert third["source"] not in (first["source"], second["source"])
    # another --resize, an added training image, an added class, another built-in --model or --stem: each
    # trains its own teacher (it was the old teacher, or a raw load_state_dict traceback), rc 0
    seen = {first["source"], second["source"], third["source"]}
    a = np.full((20, 20, 3), 200, np.uint8)

    def added_image():
        Image.fromarray(a).save(data / "train" / "c1" / "extra.png")

    def added_class():
        for split in ("train", "val"):
            (data / split / "c2").mkdir()
            for i in range(6 if split == "train" else 3):
                Image.fromarray(np.roll(a, i, 0) // (i + 1)).save(data / split / "c2" / f"{i}.png")

    for change, extra in ((None, ["--resize", "22"]), (added_image, []), (added_class, []),
                          (None, ["--model", "resnet18", "--stem", "small"]),
                          (None, ["--model", "resnet18", "--stem", "imagenet"])):
        if change is not None:
            change()
        assert main(base[:base.index("--model")] + base[base.index("--model") + 2:] + ["--image-size", "16"]
                    + (extra if "--model" in extra else ["--model", "small_cnn"] + extra)) == 0
        source = json.loads((out / "results.json").read_text())["teacher"]["source"]
        assert source not in seen, (change, extra)
        seen.add(source)
    # a zero-byte key.json: what OUT/teacher holds is unknown, so it is not reused (and no traceback)
    (out / "teacher" / "key.json").write_text("")
    with pytest.warns(RuntimeWarning, match="missing or unreadable"):
        assert main(base + ["--image-size", "16"]) == 0
    assert json.loads((out / "results.json").read_text())["teacher"]["source"] != first["source"]


def test_data_keys_follow_the_files_bytes_not_their_modification_times(tmp_path):
    """The teacher and the decode cache are keyed by the images' content: a copy of the folder elsewhere with
    new modification times (a re-provisioned or rsync-ed data set) reuses both; an image whose bytes change
    while its size and modification time are put back (what an mtime key cannot see) keys anew."""
    import os
    import shutil

    from PIL import Image

    from dntk.data.sources import image_folder
    from dntk.training.teacher import data_fingerprint

    data = _folder(tmp_path / "data")
    cache = tmp_path / "cache"
    first = image_folder(data, "train", 16, cache_dir=cache)
    copy = tmp_path / "elsewhere" / "data"
    shutil.copytree(data, copy)                                   # new mtimes
    for f in copy.rglob("*.png"):
        os.utime(f, ns=(1, 1))
    n_cached = len(list(cache.iterdir()))
    again = image_folder(copy, "train", 16, cache_dir=cache)
    assert len(list(cache.iterdir())) == n_cached                 # decoded once: the copy found the cache
    assert torch.equal(again.images, first.images) and data_fingerprint(again) == data_fingerprint(first)
    # same size and mtime, other bytes: flip one pixel value of a PNG and restore its stamp
    f = copy / "train" / "c0" / "3.png"
    st = f.stat()
    a = np.asarray(Image.open(f)).copy()
    a[0, 0, 0] ^= 1
    Image.fromarray(a).save(f)
    if f.stat().st_size != st.st_size:          # PNG compression changed the size: still the point, but say so
        pytest.skip("the edited PNG changed size; the mtime-only case needs an equal-size edit")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    from dntk.data import sources

    sources._FILE_DIGESTS.clear()                                 # a new process: nothing remembered
    edited = image_folder(copy, "train", 16, cache_dir=cache)
    assert len(list(cache.iterdir())) == n_cached + 1             # decoded again, not served from the cache
    assert data_fingerprint(edited) != data_fingerprint(first)
    # and through the CLI: the copy reuses the teacher trained on the original
    out = tmp_path / "out"
    base = ["run", "--dataset", "folder", "--model", "small_cnn", "--epochs", "1", "--train-batch-size", "4",
            "--image-size", "16", "--m", "6", "--k", "32", "--quiet", "--out", str(out)]
    assert main(base + ["--data-root", str(data)]) == 0
    trained = json.loads((out / "results.json").read_text())["teacher"]
    shutil.rmtree(copy)
    shutil.copytree(data, copy)
    history = out / "teacher" / "history.json"
    stamp = history.stat().st_mtime_ns
    assert main(base + ["--data-root", str(copy)]) == 0
    reused = json.loads((out / "results.json").read_text())["teacher"]
    assert reused["source"] == trained["source"] and reused["checksum"] == trained["checksum"]
    assert history.stat().st_mtime_ns == stamp                    # not retrained


def test_sixteen_bit_png_and_batch_size_one(tmp_path):
    """Case 5: a 16-bit PNG decoded as all white; --train-batch-size 1 with BatchNorm trained nothing (rc 0)."""
    from PIL import Image

    from dntk.data.sources import _decode

    a = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 200)   # 0 .. 51,000 of 65,535
    Image.fromarray(a).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    img = _decode(str(tmp_path / "deep.png"), 16, None)
    expect = np.clip(a / 65535 * 255 + 0.5, 0, 255).astype(np.uint8)
    assert np.array_equal(img[0].numpy(), expect) and img.float().mean() < 200
    assert main(["run", "--train-batch-size", "1", "--epochs", "1", "--quiet", "--out", str(tmp_path / "o")]) == 1


def test_lock_refuses_a_second_thread_and_keys_ignore_path_spelling(tmp_path, monkeypatch):
    import threading

    from dntk.lock import hold
    from dntk.training.teacher import data_fingerprint

    seen = []
    inside = threading.Event()
    release = threading.Event()

    def first():
        with hold(tmp_path / "o"):
            inside.set()
            release.wait(10)

    t = threading.Thread(target=first)
    t.start()
    inside.wait(10)
    try:
        with pytest.raises(DNTKError, match="another thread of this process"):
            with hold(tmp_path / "o"):
                seen.append("entered")
    finally:
        release.set()
        t.join()
    assert seen == []
    with hold(tmp_path / "o"):   # free again once the first thread left
        pass
    # the same folder spelled relative or absolute is the same data: the same teacher key
    data = _folder(tmp_path / "data")
    absolute = dntk.data.image_folder(data, "train", 16)
    monkeypatch.chdir(tmp_path)
    relative = dntk.data.image_folder("data", "train", 16)
    assert relative.files[0] != absolute.files[0]
    assert data_fingerprint(relative) == data_fingerprint(absolute)
