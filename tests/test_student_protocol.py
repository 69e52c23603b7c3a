"""WMDD's student protocol: RandomResizedCrop boxes and their resize, CutMix, the recipe's wiring."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from dntk import DNTKError
from dntk.data import digits
from dntk.models import SmallCNN
from dntk.training import (TrainConfig, crop_boxes, cutmix, random_resized_crop, resize_boxes, train,
                           train_student, wmdd_student_config)


def test_full_box_is_the_identity():
    x = torch.randn(3, 2, 9, 7)
    assert torch.allclose(random_resized_crop(x, torch.Generator().manual_seed(0), scale=(1, 1), ratio=(7 / 9, 7 / 9)),
                          x, atol=1e-6)


def test_resize_matches_interpolating_the_crop_away_from_its_border():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 16, 16, generator=g)
    boxes = torch.tensor([[2, 3, 10, 9], [0, 0, 16, 16], [5, 1, 13, 15], [4, 4, 8, 8]], dtype=torch.float32)
    out = resize_boxes(x, boxes)
    for i, (l, t, r, b) in enumerate(boxes.long().tolist()):
        ref = F.interpolate(x[i:i + 1, :, t:b, l:r], size=(16, 16), mode="bilinear", align_corners=False)[0]
        # interpolate clamps at the crop's edge, roi_align reads the neighbouring pixel: compare where
        # every sample lies inside the crop, i.e. the output pixels whose source coordinate is ≥ 0 and ≤ size-1
        sy, sx = (b - t) / 16, (r - l) / 16
        ys = [j for j in range(16) if 0 <= (j + 0.5) * sy - 0.5 <= b - t - 1]
        xs = [j for j in range(16) if 0 <= (j + 0.5) * sx - 0.5 <= r - l - 1]
        assert torch.allclose(out[i][:, ys][:, :, xs], ref[:, ys][:, :, xs], atol=1e-5)


def test_crop_boxes_follow_torchvisions_distribution():
    from torchvision.transforms import RandomResizedCrop

    n = 2000
    boxes = crop_boxes(n, 64, 48, torch.Generator().manual_seed(2))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    assert bool((boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 48).all() and (boxes[:, 3] <= 64).all())
    torch.manual_seed(0)
    img = torch.zeros(1, 64, 48)
    ref = torch.tensor([RandomResizedCrop.get_params(img, (0.08, 1.0), (3 / 4, 4 / 3))[2:] for _ in range(n)],
                       dtype=torch.float32)                                  # (h, w) per draw
    area, ref_area = w * h / (64 * 48), ref[:, 0] * ref[:, 1] / (64 * 48)
    # same distribution: means of area, aspect ratio and horizontal position within ~5 standard errors
    assert abs(float(area.mean() - ref_area.mean())) < 5 * float(ref_area.std()) * (2 / n) ** 0.5
    ratio, ref_ratio = (w / h).log(), (ref[:, 1] / ref[:, 0]).log()
    assert abs(float(ratio.mean() - ref_ratio.mean())) < 5 * float(ref_ratio.std()) * (2 / n) ** 0.5
    assert 0.07 <= float(area.min()) and float(area.max()) <= 1.0


def test_cutmix_pastes_one_box_and_reports_its_area():
    g = torch.Generator().manual_seed(3)
    x = torch.arange(5, dtype=torch.float32)[:, None, None, None].expand(5, 2, 10, 12).clone()
    for _ in range(20):
        out, perm, lam = cutmix(x, g)
        # every pixel is its own image's or its partner's value
        assert bool(((out == x) | (out == x[perm])).all())
        pasted = float((out[:, 0] == x[perm][:, 0]).float().mean(dim=(1, 2))[perm != torch.arange(5)].mean()) \
            if bool((perm != torch.arange(5)).any()) else 1 - lam
        assert pasted == pytest.approx(1 - lam, abs=1e-6)
        assert 0.0 <= lam <= 1.0


def test_wmdd_protocol_is_wired_as_stated(tmp_path):
    cfg = wmdd_student_config(300, 0, 500)
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.batch_size, cfg.augment, cfg.mix, cfg.schedule,
            cfg.soft_label_temperature) == ("adamw", 1e-3, 0.01, 100, "rrc_flip", "cutmix", "cosine", 20.0)
    assert wmdd_student_config(300, 0, 500, dataset="digits").augment == "rrc"     # no flips for digits
    tr, te = digits("train"), digits("val")
    teacher = SmallCNN(1, 10)
    train(teacher, tr, te, TrainConfig(epochs=2, augment="shift"), tmp_path / "t", progress=False)
    student, acc = train_student(SmallCNN(1, 10), teacher.eval(), tr.subset(torch.arange(60)), te, tmp_path / "s",
                                 dataset="digits", epochs=3, protocol="wmdd", progress=False)
    hist = json.loads((tmp_path / "s" / "history.json").read_text())
    assert len(hist) == 3 and hist[-1]["lr"] == pytest.approx(0.0, abs=1e-9)       # cosine to zero
    assert hist[0]["lr"] == pytest.approx(1e-3 * (1 + math.cos(math.pi / 3)) / 2, rel=1e-6)  # 1 step/epoch of 3
    with pytest.raises(DNTKError, match="relabel"):
        train_student(SmallCNN(1, 10), teacher, tr, te, tmp_path / "x", dataset="digits", epochs=1, relabel=False,
                      protocol="wmdd")
    with pytest.raises(DNTKError, match="protocol"):
        train_student(SmallCNN(1, 10), teacher, tr, te, tmp_path / "y", dataset="digits", epochs=1, protocol="srel")


def test_distill_evaluate_records_the_wmdd_protocol_student(tmp_path, capsys):
    from dntk.cli import main

    assert main(["distill", "--distill", "random", "--ipc", "5", "--epochs", "2", "--evaluate", "--evaluate-epochs", "2",
                 "--out", str(tmp_path), "--quiet"]) == 0
    folder = tmp_path / "distill-random-ipc5-seed0"
    ev = json.loads((folder / "manifest.json").read_text())["evaluation"]
    hist = json.loads((folder / f"student-wmdd-e2-{ev['student']}" / "history.json").read_text())
    assert (ev["protocol"], ev["epochs"], len(hist)) == ("wmdd", 2, 2)
    # the student is evaluated once, after its last epoch: no epoch is looked at on the test split
    assert [h["val_accuracy"] for h in hist] == [None, None] and 0 < ev["accuracy"] <= 1
    assert "student under WMDD's protocol" in capsys.readouterr().out
    assert hist[0]["val_accuracy"] is None       # evaluated once, after the last epoch
    # another teacher (more epochs) → another student, not the cached one
    assert main(["distill", "--distill", "random", "--ipc", "5", "--epochs", "3", "--evaluate", "--evaluate-epochs", "2",
                 "--out", str(tmp_path), "--quiet"]) == 0
    ev2 = json.loads((folder / "manifest.json").read_text())["evaluation"]
    assert ev2["student"] != ev["student"] and ev2["teacher_accuracy"] != ev["teacher_accuracy"]
    with pytest.raises(SystemExit):
        main(["run", "--evaluate", "--out", str(tmp_path)])          # a distill-only flag
