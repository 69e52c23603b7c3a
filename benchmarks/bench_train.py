"""Training step time: the classic pipeline (per-image CPU augmentation, a host copy and a read-back per
batch) against the device pipeline (dntk.training.device: resident images, batched augmentation, no host
sync in the step loop), on this machine's device.

Usage:  python benchmarks/bench_train.py [--device cpu|cuda] [--size 64] [--steps 6] [--threads 2]

Rows: the teacher recipe (ResNet-18, ImageNet stem, crop_flip, SGD, batch 128) and the WMDD student recipe
(RandomResizedCrop + flip, CutMix, the teacher relabelling every batch, AdamW, batch 100), each with the
augmentation alone timed too. Steps alternate between the pipelines (classic, device, classic, ...) so a
drift in the machine's speed hits both; the median over steps is reported, with the ratio in the same run.
Writes benchmarks/results/train_steps[-<device>].json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, table, write_json  # noqa: E402

from dntk.data.images import ImageSet  # noqa: E402
from dntk.models import build_model  # noqa: E402
from dntk.training import device as dev  # noqa: E402
from dntk.training import loop  # noqa: E402
from dntk.training.loop import TrainConfig  # noqa: E402


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    n = 512
    data = ImageSet(torch.randint(0, 256, (n, 3, args.size, args.size), dtype=torch.uint8, generator=g),
                    torch.arange(n) % 10, [str(c) for c in range(10)])
    recipes = {
        "teacher (crop_flip, SGD, batch 128)": (TrainConfig(batch_size=128, augment="crop_flip"), False),
        "WMDD student (rrc_flip + CutMix, relabel, batch 100)": (
            TrainConfig(batch_size=100, optimizer="adamw", lr=1e-3, augment="rrc_flip", mix="cutmix",
                        soft_label_temperature=20.0), True),
    }
    rows, out = [], {"machine": machine(), "device": str(device), "size": args.size, "rows": {}}
    for name, (cfg, relabel) in recipes.items():
        torch.manual_seed(0)
        model = build_model("resnet18", 10, 3, args.size, stem="imagenet").to(device).train()
        teacher = build_model("resnet18", 10, 3, args.size, stem="imagenet").to(device).eval() if relabel else None
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if cfg.optimizer == "sgd" else \
            torch.optim.AdamW(model.parameters(), lr=1e-3)
        sched = torch.optim.lr_scheduler.ConstantLR(opt, 1.0)
        resident = dev.Resident(data, device)
        gen = torch.Generator().manual_seed(0)
        times = {"classic": [], "device": [], "classic aug": [], "device aug": []}
        perm = torch.randperm(n, generator=gen)
        for step in range(args.steps + 1):
            idx = perm[(step * cfg.batch_size) % (n - cfg.batch_size):][:cfg.batch_size]
            for pipe in ("classic", "device"):
                _sync(device)
                t0 = time.perf_counter()
                if pipe == "classic":
                    x, _ = data.tensors(idx)
                    x = loop.augment_batch(x, cfg.augment, gen)
                    x = x.to(device)
                    if cfg.mix == "cutmix":
                        x, _, _ = loop.cutmix(x, gen)
                    t_aug = time.perf_counter()   # then one whole classic step (its own augmentation included)
                    total, _ = loop._classic_epoch(model, opt, sched, data, idx, cfg, gen, device, True, teacher, None,
                                                   0, 0.01)
                else:
                    d = dev.draw_batch(idx, resident.shape, cfg.augment, cfg.mix, gen).to(device)
                    x, _ = resident.batch(d.index)
                    x = dev.augment_on_device(x, d, cfg.augment)
                    _sync(device)
                    t_aug = time.perf_counter()   # then one whole device step (its own draws included)
                    total, _ = loop._device_epoch(model, opt, sched, resident, idx, cfg, gen, device, teacher, None)
                    float(total)
                _sync(device)
                t1 = time.perf_counter()
                if step:   # the first step of each warms up
                    times[pipe].append(t1 - t_aug)
                    times[f"{pipe} aug"].append(t_aug - t0)
        med = {k: statistics.median(v) for k, v in times.items()}
        out["rows"][name] = {**{f"{k} s": v for k, v in med.items()}, "steps": args.steps,
                             "ratio step (device/classic)": med["device"] / med["classic"],
                             "ratio aug (device/classic)": med["device aug"] / med["classic aug"]}
        rows.append({"recipe": name, **{k: 1e3 * v for k, v in med.items()},
                     "ra": med["device aug"] / med["classic aug"], "rs": med["device"] / med["classic"]})
    print(table(rows, [("recipe", "recipe", ""), ("classic aug", "augmentation, classic (ms)", "{:.1f}"),
                       ("device aug", "augmentation, device (ms)", "{:.1f}"), ("ra", "ratio", "{:.2f}×"),
                       ("classic", "whole step, classic (ms)", "{:.0f}"), ("device", "whole step, device (ms)", "{:.0f}"),
                       ("rs", "ratio", "{:.2f}×")]))
    name = "train_steps.json" if device.type == "cpu" else f"train_steps-{device.type}.json"
    write_json(name, out)


def render(d: dict) -> str:
    """docs/run.md's sentence on the two training pipelines (block ``train-steps``) from train_steps.json."""
    rows = d["rows"].values()
    step = [r["ratio step (device/classic)"] for r in rows]
    aug = [r["ratio aug (device/classic)"] for r in rows]
    m = d["machine"]
    return (f"`python3 benchmarks/bench_train.py` on the {d['device'].upper()} ({m['cpu_threads']} thread"
            f"{'s' * (m['cpu_threads'] != 1)}, {d['size']} px, {len(step)} recipes; `benchmarks/results/train_steps.json`): "
            f"the device pipeline's whole step takes {min(step):.2f}–{max(step):.2f}× the classic's, its augmentation "
            f"{min(aug):.2f}–{max(aug):.2f}× — a training step here is all convolution.")


if __name__ == "__main__":
    main()
