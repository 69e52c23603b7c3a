"""The device training pipeline (dntk.training.device) against the classic per-image loop: the same
augmentation distributions, the same crops for the same draws, bit-identical training where no draw
is made, no host synchronisation in the step, resume, and a CPU run that trains."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import ks_2samp
from torch.overrides import TorchFunctionMode

from dntk.data.images import ImageSet
from dntk.distill.distilled import DistilledSet
from dntk.errors import DNTKError
from dntk.models import build_model
from dntk.training import device as dev
from dntk.training import loop
from dntk.training.loop import TrainConfig, augment_batch, crop_boxes, cutmix, evaluate, resize_boxes, same_config, train


def toy_set(n=120, C=4, size=16, seed=0):
    """C classes told apart by a bright square in a class-specific place and channel."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % C
    img = torch.randint(0, 60, (n, 3, size, size), dtype=torch.uint8, generator=g)
    half = size // 2
    for c in range(C):
        r, q = divmod(c % 4, 2)
        img[labels == c, c % 3, r * half:(r + 1) * half, q * half:(q + 1) * half] += 150
    return ImageSet(img, labels, [f"c{c}" for c in range(C)])


def _boxes_stats(boxes, h, w):
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    return {"area": (bw * bh / (h * w)).numpy(), "log_ratio": torch.log(bw / bh).numpy(),
            "left": (boxes[:, 0] / (w - bw + 1)).numpy(), "top": (boxes[:, 1] / (h - bh + 1)).numpy()}


@pytest.mark.parametrize("h,w,scale", [(64, 64, (0.08, 1.0)), (40, 64, (0.08, 1.0)), (32, 32, (0.6, 1.0))])
def test_batched_crop_boxes_follow_torchvisions_distribution(h, w, scale):
    """crop_boxes_batched against the per-image loop (crop_boxes, torchvision's algorithm): area fraction,
    aspect ratio and relative position, two-sample KS at n = 6000 each. The KS statistic's 0.1% critical
    value at these sizes is 1.95·sqrt(2/6000) = 0.036; a wrong scale, ratio or position law gives > 0.1."""
    n = 6000
    classic = crop_boxes(n, h, w, torch.Generator().manual_seed(1), scale=scale)
    batched = dev.crop_boxes_batched(n, h, w, torch.Generator().manual_seed(2), scale=scale)
    assert batched.shape == (n, 4) and batched.dtype == torch.float32
    assert (batched[:, 0] >= 0).all() and (batched[:, 2] <= w).all() and (batched[:, 1] >= 0).all() and (batched[:, 3] <= h).all()
    assert (batched == batched.round()).all()   # whole pixels, as the loop
    a, b = _boxes_stats(classic, h, w), _boxes_stats(batched, h, w)
    for key in a:
        assert ks_2samp(a[key], b[key]).statistic < 0.036, key
    # and the test can tell distributions apart: another scale range fails it
    other = _boxes_stats(dev.crop_boxes_batched(n, h, w, torch.Generator().manual_seed(3), scale=(0.3, 1.0)), h, w)
    if scale[0] < 0.3:
        assert ks_2samp(a["area"], other["area"]).statistic > 0.1


def test_batched_crop_boxes_fall_back_to_the_central_crop():
    """No try can fit (a 4 × 64 strip, ratio ≈ 1): every box is the central crop of the clamped ratio,
    as the loop's fallback."""
    classic = crop_boxes(50, 4, 64, torch.Generator().manual_seed(0), scale=(0.5, 1.0))
    batched = dev.crop_boxes_batched(50, 4, 64, torch.Generator().manual_seed(0), scale=(0.5, 1.0))
    assert torch.equal(classic, batched)
    assert torch.equal(batched[0], torch.tensor([29.0, 0.0, 34.0, 4.0]))   # round(4·4/3) = 5 wide, centred


@pytest.mark.parametrize("mode", ["crop_flip", "shift"])
def test_shift_crop_equals_the_per_image_crop(mode):
    """One gather for the batch equals cutting each padded image at its offset (the classic loop), for
    reflect (crop_flip) and minimum-filled (shift) padding; flips as torch.flip."""
    x = torch.randn(7, 3, 16, 12)
    p = dev.pad_of(mode, 16)
    off = torch.randint(0, 2 * p + 1, (7, 2), generator=torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (p, p, p, p), mode="reflect" if mode == "crop_flip" else "constant",
                                     value=float(x.min()) if mode == "shift" else 0.0)
    expect = torch.stack([padded[i, :, off[i, 0]: off[i, 0] + 16, off[i, 1]: off[i, 1] + 12] for i in range(7)])
    got = dev.shift_crop(x, off, p, mode)
    assert got.is_contiguous() and torch.equal(got, expect)
    flip = torch.tensor([True, False, True, True, False, False, True])
    d = dev.Draws(torch.arange(7), offsets=off, flip=flip)
    out = dev.augment_on_device(x, d, mode)
    expect[flip] = expect[flip].flip(-1)
    assert torch.equal(out, expect)


def test_resized_crop_and_cutmix_equal_the_classic_ones():
    """The device RandomResizedCrop is resize_boxes (roi_align) for the same boxes; CutMix's draws are
    made in the classic order (λ, permutation, centre), so one seed gives the classic cutmix exactly."""
    x = torch.randn(6, 3, 20, 20)
    boxes = dev.crop_boxes_batched(6, 20, 20, torch.Generator().manual_seed(0))
    assert torch.equal(dev.resized_crop(x, boxes), resize_boxes(x, boxes))
    mixed, perm, lam = cutmix(x, torch.Generator().manual_seed(5))
    d = dev.draw_batch(torch.arange(6), (3, 20, 20), "none", "cutmix", torch.Generator().manual_seed(5))
    assert torch.equal(d.perm, perm) and d.lam == lam
    assert torch.equal(dev.augment_on_device(x, d, "none"), mixed)


def test_flip_and_offset_draws_are_uniform():
    """Offsets uniform on 0..2p and flips Bernoulli(1/2), as the loop draws them (chi-square-free check:
    every value occurs, frequencies within 5 sd of n/k)."""
    idx = torch.arange(20000)
    d = dev.draw_batch(idx, (3, 32, 32), "crop_flip", "none", torch.Generator().manual_seed(0))
    counts = torch.bincount(d.offsets.flatten(), minlength=9).double()
    k, n = 9, d.offsets.numel()
    assert counts.numel() == k and (counts - n / k).abs().max() < 5 * np.sqrt(n / k)
    assert abs(d.flip.double().mean() - 0.5) < 5 * 0.5 / np.sqrt(20000)


def test_device_pipeline_without_draws_is_the_classic_pipeline_bit_for_bit(tmp_path):
    """With augment='none' and no mix, both pipelines draw only the epoch permutation from one generator:
    the same batches, the same arithmetic (normalisation, loss), so the same weights bit for bit on the CPU —
    the device pipeline taken (recorded in last.pt's configuration)."""
    data = toy_set()
    models = []
    for pipe in ("classic", "device"):
        torch.manual_seed(0)
        m = build_model("small_cnn", 4, 3, 16)
        cfg = TrainConfig(epochs=2, batch_size=32, select="last", pipeline=pipe, augment="none", optimizer="adamw")
        train(m, data, None, cfg, tmp_path / pipe, progress=False)
        stored = json.loads(torch.load(tmp_path / pipe / "last.pt", weights_only=False)["config"])
        assert stored["pipeline"] == pipe
        models.append(m)
    for a, b in zip(models[0].state_dict().values(), models[1].state_dict().values()):
        assert torch.equal(a, b)


SYNCS = {"item", "__bool__", "tolist", "__int__", "__float__", "__index__", "numpy", "nonzero", "cpu",
         "masked_select", "argwhere", "unique", "__len__"}


class SyncCounter(TorchFunctionMode):
    """Records every tensor call that reads a value back to the host, and indexing by boolean masks
    (a nonzero in disguise)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        if name in SYNCS:
            self.seen.append(name)
        if name in ("__getitem__", "__setitem__") and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                self.seen.append(f"{name}[bool]")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("augment,mix,labels", [("crop_flip", "none", None), ("rrc_flip", "cutmix", "teacher"),
                                                 ("shift", "cutmix", "soft")])
def test_the_device_step_reads_nothing_back(tmp_path, monkeypatch, augment, mix, labels):
    """Every torch call our code makes inside the device step (gather, normalisation, augmentation, mix,
    forward, loss, the backward call) is watched: none reads a value back or indexes by a mask. (A
    TorchFunctionMode sees neither the ops inside autograd's backward nor the optimizer's and scheduler's
    steps, which run outside the step function; the CUDA test below runs the whole epoch loop under
    torch.cuda.set_sync_debug_mode('error').) The same watch on the classic epoch does see them (the check
    can fail)."""
    data = toy_set(n=64)
    teacher = build_model("small_cnn", 4, 3, 16).eval()
    extra = {"teacher": teacher} if labels == "teacher" else (
        {"soft_labels": torch.randn(64, 4)} if labels == "soft" else {})
    counters = []
    real = loop._device_step

    def watched(*a, **k):
        with SyncCounter() as c:
            out = real(*a, **k)
        counters.append(c)
        return out

    monkeypatch.setattr(loop, "_device_step", watched)
    cfg = TrainConfig(epochs=1, batch_size=16, select="last", pipeline="device", augment=augment, mix=mix)
    train(build_model("small_cnn", 4, 3, 16), data, None, cfg, tmp_path / "d", progress=False, **extra)
    assert len(counters) == 4 and all(c.seen == [] for c in counters), [c.seen for c in counters]

    classic = []
    real_classic = loop._classic_epoch

    def watched_classic(*a, **k):
        with SyncCounter() as c:
            out = real_classic(*a, **k)
        classic.append(c)
        return out

    monkeypatch.setattr(loop, "_classic_epoch", watched_classic)
    train(build_model("small_cnn", 4, 3, 16), data, None, TrainConfig(epochs=1, batch_size=16, select="last",
          pipeline="classic", augment=augment, mix=mix), tmp_path / "c", progress=False, **extra)
    assert {"item", "__bool__"} <= set(classic[0].seen)


def test_device_pipeline_trains_on_the_cpu_and_resumes_bit_identically(tmp_path):
    """A CPU run of the device pipeline learns the toy task (chance is 0.25), and a run stopped after one
    epoch (max_seconds=0) and resumed ends with the uninterrupted run's weights and history."""
    data, val = toy_set(n=160), toy_set(n=80, seed=1)
    cfg = TrainConfig(epochs=4, batch_size=32, pipeline="device", augment="crop_flip", optimizer="adamw")
    torch.manual_seed(0)
    full = build_model("small_cnn", 4, 3, 16)
    r_full = train(full, data, val, cfg, tmp_path / "full", progress=False)
    assert evaluate(full, val)[0] > 0.9
    torch.manual_seed(0)
    part = build_model("small_cnn", 4, 3, 16)
    r1 = train(part, data, val, cfg, tmp_path / "part", progress=False, max_seconds=0)
    assert len(r1.history) == 1
    torch.manual_seed(1)
    again = build_model("small_cnn", 4, 3, 16)
    r2 = train(again, data, val, cfg, tmp_path / "part", progress=False)
    assert r2.resumed_from == 1 and r2.best_epoch == r_full.best_epoch
    for a, b in zip(full.state_dict().values(), again.state_dict().values()):
        assert torch.equal(a, b)
    assert [h["train_loss"] for h in r2.history] == [h["train_loss"] for h in r_full.history]


def test_device_pipeline_takes_a_distilled_set_and_refuses_token_data(tmp_path):
    """A DistilledSet (normalised float images) trains through the device pipeline on the values its
    tensors() gives; data without images is refused by name under 'device' and classic under 'auto'."""
    data = toy_set(n=40)
    ds = DistilledSet.from_normalised(data.tensors()[0], data.labels, data, "random")
    r = dev.Resident(ds, torch.device("cpu"))
    idx = torch.tensor([3, 1, 7])
    assert torch.equal(r.batch(idx)[0], ds.tensors(idx)[0])
    assert torch.equal(dev.Resident(data, torch.device("cpu")).batch(idx)[0], data.tensors(idx)[0])
    assert dev.resolve_pipeline("auto", "cpu", ds) == "classic"
    assert dev.resolve_pipeline("device", "cpu", ds) == "device"

    class Tokens:
        labels = torch.zeros(4, dtype=torch.long)
    with pytest.raises(DNTKError, match="pipeline='classic'"):
        dev.resolve_pipeline("device", "cpu", Tokens())
    with pytest.raises(DNTKError, match="unknown training pipeline"):
        dev.resolve_pipeline("fast", "cpu", data)
    assert dev.resolve_pipeline("auto", "cuda", data) == "device" and dev.resolve_pipeline("auto", "cuda", Tokens()) == "classic"


def test_a_classic_checkpoint_from_before_the_device_pipeline_is_still_reused():
    """A checkpoint configuration written before the field existed (no 'pipeline' key) is a classic run:
    it matches the classic pipeline and not the device one."""
    cfg = TrainConfig(epochs=3)
    stored = json.loads(loop._config_json(TrainConfig(epochs=3, pipeline="classic"), False))
    del stored["pipeline"]
    old = json.dumps(stored)
    assert same_config(old, TrainConfig(epochs=3, pipeline="classic"))
    assert not same_config(old, TrainConfig(epochs=3, pipeline="device"))
    assert cfg.pipeline == "auto"


def test_a_diverging_device_run_is_refused_at_the_epochs_end(tmp_path):
    """The finite check moved from every batch to the epoch's end (one read-back per epoch): a learning
    rate that blows up still stops the run with a message, before any checkpoint of the bad epoch."""
    data = toy_set(n=64)
    cfg = TrainConfig(epochs=2, batch_size=16, select="last", pipeline="device", lr=1e12,
                      weight_decay=0.0)
    with pytest.raises(DNTKError, match="non-finite in epoch 1"):
        train(build_model("small_cnn", 4, 3, 16), data, None, cfg, tmp_path / "x", progress=False)
    assert not (tmp_path / "x" / "last.pt").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_device_pipeline_has_no_host_sync_and_trains(tmp_path):
    """On a GPU: the whole step loop of an epoch (draws moved pinned, the step, optimizer and scheduler)
    runs under torch.cuda.set_sync_debug_mode('error'), bf16 autocast and channels_last; the model comes
    back in the default memory format and learns the toy task."""
    data, val = toy_set(n=256), toy_set(n=80, seed=1)
    model = build_model("small_cnn", 4, 3, 16).cuda()
    cfg = TrainConfig(epochs=3, batch_size=32, pipeline="device", augment="rrc_flip", mix="none", optimizer="adamw",
                      select="last")
    real = loop._device_epoch
    epochs = []

    def strict(*a, **k):
        torch.cuda.set_sync_debug_mode("error")   # any synchronising call in the epoch's step loop raises
        try:
            out = real(*a, **k)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        epochs.append(out[1])
        return out

    import unittest.mock as mock
    with mock.patch.object(loop, "_device_epoch", strict):
        train(model, data, None, cfg, tmp_path / "g", device="cuda", progress=False)
    assert epochs == [256, 256, 256]
    assert all(p.is_contiguous() for p in model.parameters())
    assert evaluate(model, val, device="cuda")[0] > 0.8
