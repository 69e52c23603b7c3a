"""Teacher (and student) training: SGD or AdamW with a cosine schedule, tensor-level augmentation,
evaluation every epoch, the best checkpoint kept, and resume after interruption. Two pipelines make the
batches (``TrainConfig.pipeline``): ``classic``, per-image augmentation on the CPU (the CPU default, so
CPU results stay as they were), and ``device`` (:mod:`dntk.training.device`: images resident on the
device, batched augmentation, no host sync in the step loop, bf16 autocast on CUDA; the CUDA default).

Files in ``out_dir``: ``last.pt`` (everything needed to resume, written atomically every epoch),
``best.pt`` (the best-validation-accuracy weights, or with ``select="last"`` / no validation set the final
epoch's), ``history.json`` (per-epoch loss, accuracy and wall seconds). Every file is written atomically
(:func:`dntk.store.atomic_save`, fsync'ed); a torn or zero-byte ``last.pt`` — or a torn ``best.pt`` while the
best epoch is being selected — is treated as missing: training restarts from epoch 0, with a warning naming
the file (the best weights cannot be recovered from ``last.pt``); a torn ``history.json`` is written again
from ``last.pt``.
A finished run found in ``out_dir`` with the same configuration is returned without retraining.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import samples
from ..data.images import ImageSet
from ..errors import DNTKError
from ..store import atomic_json, atomic_save, load_or_none, read_json
from .device import Resident, draw_batch, prepare, release, resolve_pipeline, step_loss


@dataclass
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    optimizer: str = "sgd"            # "sgd" | "adamw"
    lr: float | None = None           # default 0.05 (sgd) / 2e-3 (adamw)
    weight_decay: float = 5e-4
    momentum: float = 0.9
    augment: str = "crop_flip"        # "crop_flip" | "rrc_flip" | "rrc" | "shift" | "none"
    mix: str = "none"                 # "none" | "cutmix" (every batch, λ ~ Beta(1, 1), as WMDD / SRe2L)
    schedule: str = "onecycle"        # "onecycle" (15% warm-up, cosine) | "cosine" (cosine from lr to 0)
    label_smoothing: float = 0.0
    seed: int = 0
    soft_label_temperature: float = 4.0   # used when soft labels (a teacher) are given
    eval_every: int = 1                   # evaluate every N epochs (and always after the last)
    select: str = "best"                  # "best": the best validation epoch's weights | "last": the final epoch's
    pipeline: str = "auto"                # "classic" (per-image CPU augmentation) | "device" (dntk.training.device:
    #                                       images resident, batched augmentation, no host syncs, bf16 on CUDA) |
    #                                       "auto": device on CUDA for image sets, classic elsewhere

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return 0.05 if self.optimizer == "sgd" else 2e-3


@dataclass
class TrainResult:
    model: nn.Module
    best_accuracy: float | None    # the validation accuracy of the kept epoch (None: no validation set)
    best_epoch: int                # the kept epoch (1-based)
    history: list = field(default_factory=list)
    seconds: float = 0.0
    resumed_from: int = 0


def _config_json(config: TrainConfig, relabel_teacher: bool) -> str:
    return json.dumps({**asdict(config), "relabel_teacher": relabel_teacher}, sort_keys=True)


def same_config(stored_json: str | None, config: TrainConfig, relabel_teacher: bool = False) -> bool:
    """A checkpoint's stored configuration matches ``config`` (and the label source: fixed or
    relabelled by a teacher); keys added after the checkpoint was written count as their defaults, so
    old runs stay resumable."""
    if not stored_json:
        return False
    stored = json.loads(stored_json)
    expected = json.loads(_config_json(config, relabel_teacher))
    defaults = json.loads(_config_json(TrainConfig(pipeline="classic"), False))   # runs before the device
    #                                                                              pipeline were classic
    return all(stored.get(key, defaults[key]) == value for key, value in expected.items())


def crop_boxes(B: int, h: int, w: int, gen: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """torchvision's RandomResizedCrop box per image: area fraction ~ U(scale), log-uniform aspect
    ratio, 10 tries, then the central crop of the clamped ratio. Returns [B, 4] (left, top, right, bottom)
    in pixel-edge coordinates."""
    boxes = torch.empty(B, 4)
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for i in range(B):
        for _ in range(10):
            target = h * w * (scale[0] + (scale[1] - scale[0]) * float(torch.rand(1, generator=gen)))
            ar = math.exp(lo + (hi - lo) * float(torch.rand(1, generator=gen)))
            cw, ch = round(math.sqrt(target * ar)), round(math.sqrt(target / ar))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
                left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
                break
        else:
            r = w / h
            cw, ch = (w, round(w / ratio[0])) if r < ratio[0] else ((round(h * ratio[1]), h) if r > ratio[1] else (w, h))
            cw, ch = min(cw, w), min(ch, h)
            top, left = (h - ch) // 2, (w - cw) // 2
        boxes[i] = torch.tensor([left, top, left + cw, top + ch], dtype=torch.float32)
    return boxes


def resize_boxes(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each image's box [B, 4] (left, top, right, bottom) resized to the full h × w, bilinear with
    half-pixel centres, one ``torchvision.ops.roi_align`` call for the batch. x [B, c, h, w] → [B, c, h, w].
    Equal to F.interpolate(align_corners=False) of the crop wherever the sample lies inside the crop;
    at the crop's edge it interpolates with the neighbouring pixels of the full image where
    torchvision's resized_crop clamps to the crop's border (a difference of a fraction of a pixel)."""
    from torchvision.ops import roi_align

    B, _, h, w = x.shape
    rois = torch.cat([torch.arange(B, dtype=torch.float32)[:, None], boxes.float()], 1).to(x.device, x.dtype)
    return roi_align(x, rois, output_size=(h, w), spatial_scale=1.0, sampling_ratio=1, aligned=True)


def random_resized_crop(x: torch.Tensor, gen: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """torchvision's RandomResizedCrop for every image of a batch x [B, c, h, w] → [B, c, h, w]."""
    B, _, h, w = x.shape
    return resize_boxes(x, crop_boxes(B, h, w, gen, scale, ratio))


def cutmix(x: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, float]:
    """CutMix of a batch x [B, c, h, w] with its own random permutation: λ ~ Beta(1, 1) = U(0, 1), a box
    of area (1 − λ)·h·w (clipped at the border) from x[perm] pasted at a uniform centre. Returns (mixed
    [B, c, h, w], perm [B], λ corrected to the pasted area)."""
    B, _, h, w = x.shape
    lam = float(torch.rand(1, generator=gen))
    perm = torch.randperm(B, generator=gen)
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(torch.randint(0, h, (1,), generator=gen)), int(torch.randint(0, w, (1,), generator=gen))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    out = x.clone()
    out[:, :, y0:y1, x0:x1] = x[perm.to(x.device)][:, :, y0:y1, x0:x1]
    return out, perm, 1.0 - (y1 - y0) * (x1 - x0) / (h * w)


def augment_batch(x: torch.Tensor, mode: str, gen: torch.Generator) -> torch.Tensor:
    """x: normalised float [B, c, h, w]. ``crop_flip``: reflect-pad by h/8, random crop, random
    horizontal flip. ``rrc_flip``: RandomResizedCrop(scale 0.08–1) and random horizontal flip (the
    student augmentation of SRe2L / WMDD); ``rrc``: the same without flips (digits). ``shift``: random translation by up to 1 px (for digits,
    where flips change the class)."""
    if mode == "none":
        return x
    if mode in ("rrc_flip", "rrc"):
        out = random_resized_crop(x, gen)
        if mode == "rrc_flip":
            flip = torch.rand(x.shape[0], generator=gen) < 0.5
            out[flip] = out[flip].flip(-1)
        return out
    if mode not in ("crop_flip", "shift"):
        raise DNTKError(f"unknown augmentation {mode!r}; use crop_flip, rrc_flip, rrc, shift or none")
    B, _, h, w = x.shape
    pad = max(1, h // 8) if mode == "crop_flip" else 1
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect" if mode == "crop_flip" else "constant",
                   value=float(x.min()) if mode == "shift" else 0.0)
    dy = torch.randint(0, 2 * pad + 1, (B,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (B,), generator=gen)
    out = torch.stack([padded[i, :, dy[i]: dy[i] + h, dx[i]: dx[i] + w] for i in range(B)])
    if mode == "crop_flip":
        flip = torch.rand(B, generator=gen) < 0.5
        out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def evaluate(model: nn.Module, data, batch_size: int = 256, device="cpu") -> tuple[float, torch.Tensor]:
    """(accuracy, logits float32 [n, C]) in eval mode; the model's mode is restored. data: an ImageSet or
    any set with ``tensors(index)`` and ``labels`` (:class:`dntk.data.SampleSet`)."""
    was = model.training
    model.eval()
    outs = []
    for s in range(0, len(data), batch_size):
        x, _ = data.tensors(torch.arange(s, min(s + batch_size, len(data))))
        outs.append(samples.call(model, samples.to(x, device)).float().cpu())
    model.train(was)
    logits = torch.cat(outs)
    return float((logits.argmax(1) == data.labels).float().mean()), logits


def _classic_epoch(model, opt, sched, train_set, perm, config, gen, device, images, teacher, soft_labels, epoch,
                   lr) -> tuple[float, int]:
    """One epoch of the classic pipeline: per-batch CPU augmentation (:func:`augment_batch`), a host copy
    and a finite check per batch. Returns (summed loss, samples seen)."""
    n = perm.numel()
    total, seen = 0.0, 0
    for s in range(0, n, config.batch_size):
        idx = perm[s: s + config.batch_size]
        if idx.numel() < 2 and n > 1:
            continue  # BatchNorm needs two samples
        x, y = train_set.tensors(idx)
        if images:
            x = augment_batch(x, config.augment, gen)
        x = samples.to(x, device)
        partner, lam = None, 1.0
        if config.mix == "cutmix":
            x, partner, lam = cutmix(x, gen)
            partner = partner.to(device)
        out = samples.call(model, x)
        if soft_labels is not None or teacher is not None:
            T = config.soft_label_temperature
            if teacher is not None:    # the teacher labels the (mixed) crop the student sees
                with torch.no_grad():
                    prob = F.softmax(samples.call(teacher, x) / T, 1)
            else:
                prob = F.softmax(soft_labels[idx].to(device) / T, 1)
                if partner is not None:
                    prob = lam * prob + (1 - lam) * prob[partner]
            loss = F.kl_div(F.log_softmax(out / T, 1), prob, reduction="batchmean") * T * T
        else:
            y = y.to(device)
            loss = F.cross_entropy(out, y, label_smoothing=config.label_smoothing)
            if partner is not None:
                loss = lam * loss + (1 - lam) * F.cross_entropy(out, y[partner],
                                                                label_smoothing=config.label_smoothing)
        if not torch.isfinite(loss):
            raise DNTKError(f"training loss became {float(loss)} at epoch {epoch + 1}; lower the learning rate "
                            f"(now {lr}) or use --optimizer adamw")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        total += loss.item() * idx.numel()
        seen += idx.numel()
    return total, seen


def _device_step(model, opt, resident, draws, config, teacher, soft_labels) -> torch.Tensor:
    """Forward, loss and backward of one batch on the device (:mod:`dntk.training.device`); returns the
    loss tensor (not read back)."""
    loss = step_loss(model, resident, draws, config, teacher=teacher, soft_labels=soft_labels)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach()


def _device_epoch(model, opt, sched, resident, perm, config, gen, dev, teacher, soft_labels) -> tuple[torch.Tensor, int]:
    """One epoch of the device pipeline: the batch's draws from ``gen`` moved without a sync, the step on
    the device, the loss summed there (the caller reads it once). Returns (summed loss, a 0-d tensor on the
    device; samples seen)."""
    n = perm.numel()
    total, seen = torch.zeros((), device=dev), 0
    for s in range(0, n, config.batch_size):
        idx = perm[s: s + config.batch_size]
        if idx.numel() < 2 and n > 1:
            continue  # BatchNorm needs two samples
        draws = draw_batch(idx, resident.shape, config.augment, config.mix, gen).to(dev)
        loss = _device_step(model, opt, resident, draws, config, teacher, soft_labels)
        opt.step()
        sched.step()
        total += loss * idx.numel()
        seen += idx.numel()
    return total, seen


def train(model: nn.Module, train_set: ImageSet, val_set: ImageSet | None, config: TrainConfig, out_dir, *,
          soft_labels: torch.Tensor | None = None, teacher: nn.Module | None = None, device="cpu",
          progress: bool = True, resume: bool = True, max_seconds: float | None = None) -> TrainResult:
    """Train ``model`` on ``train_set``, evaluating on ``val_set`` every ``eval_every`` epochs; the weights
    returned (and in ``best.pt``) are the best validation epoch's (``config.select="best"``) or the final
    epoch's (``select="last"``, and always when ``val_set`` is None: nothing is selected). The validation
    set chooses the epoch, so an accuracy reported on it is optimistic: report on data it never saw.

    soft_labels: optional teacher logits [n_train, C]; then the loss is the temperature-scaled KL
    divergence to softmax(soft_labels / T) instead of cross-entropy — one fixed target per image.
    teacher: instead, relabel every *augmented* batch with the teacher's logits (eval mode, no grad), as
    WMDD / FKD do, so the target always describes the crop the student sees. Not both.
    max_seconds: stop after the epoch that crosses this wall-clock budget (the run can be resumed).
    """
    if config.optimizer not in ("sgd", "adamw"):
        raise DNTKError(f"unknown optimizer {config.optimizer!r}; use 'sgd' or 'adamw'")
    if config.epochs < 1:
        raise DNTKError(f"epochs must be ≥ 1, got {config.epochs}")
    if config.select not in ("best", "last"):
        raise DNTKError(f"unknown select {config.select!r}; use 'best' (the best validation epoch) or 'last'")
    if config.select == "best" and val_set is None:
        raise DNTKError("select='best' chooses the epoch on a validation set; give val_set, or use select='last'")
    if config.batch_size < 2 and len(train_set) > 1 and any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        raise DNTKError(f"batch size {config.batch_size} with BatchNorm layers: every batch of one sample would be "
                        "skipped (batch statistics of one sample are undefined), so nothing would be trained; use "
                        "--train-batch-size 2 or more")
    if soft_labels is not None and teacher is not None:
        raise DNTKError("give soft_labels (fixed per image) or teacher (relabels each augmented batch), not both")
    if soft_labels is not None and soft_labels.shape[0] != len(train_set):
        raise DNTKError(f"soft_labels has {soft_labels.shape[0]} rows for {len(train_set)} training images")
    config = replace(config, pipeline=resolve_pipeline(config.pipeline, device, train_set))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg_json = _config_json(config, teacher is not None)
    model.to(device)
    if teacher is not None:
        teacher.to(device).eval()
    lr = config.resolved_lr()
    if config.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=config.momentum, weight_decay=config.weight_decay,
                              nesterov=True)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=config.weight_decay)
    n = len(train_set)
    steps_per_epoch = math.ceil(n / config.batch_size)
    if config.schedule == "onecycle":
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=config.epochs * steps_per_epoch,
                                                    pct_start=0.15, anneal_strategy="cos", div_factor=10.0,
                                                    final_div_factor=100.0)
    elif config.schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs * steps_per_epoch)
    else:
        raise DNTKError(f"unknown schedule {config.schedule!r}; use 'onecycle' or 'cosine'")
    if config.mix not in ("none", "cutmix"):
        raise DNTKError(f"unknown mix {config.mix!r}; use 'none' or 'cutmix'")
    images = samples.is_images(train_set.tensors(torch.arange(1))[0])
    if not images and (config.augment not in ("none",) or config.mix != "none"):
        raise DNTKError(f"augment={config.augment!r} / mix={config.mix!r} need image tensors [n, c, h, w]; this data is "
                        f"{samples.describe(train_set.tensors(torch.arange(1))[0])} — use augment='none', mix='none'")
    gen = torch.Generator().manual_seed(config.seed)
    start_epoch, history, best = 0, [], (-1.0, -1)
    last = out_dir / "last.pt"
    state = load_or_none(last, trusted=True, what="training restarts from epoch 0") if resume else None
    if state is not None and config.select == "best" and list(state.get("best", (-1, -1)))[1] > 0 and \
            load_or_none(out_dir / "best.pt", trusted=False, what="training restarts from epoch 0") is None:
        state = None   # the best weights are lost or torn: the selection cannot be resumed
    if state is not None:
        if same_config(state.get("config"), config, relabel_teacher=teacher is not None):
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["optimizer"])
            sched.load_state_dict(state["scheduler"])
            gen.set_state(state["generator"])
            start_epoch, history, best = state["epoch"], state["history"], tuple(state["best"])
    resumed_from = start_epoch
    t0 = time.perf_counter()
    bar = tqdm(total=config.epochs, initial=start_epoch, desc="training", unit="epoch", disable=not progress)
    fast = config.pipeline == "device"
    dev = torch.device(device)
    if fast:
        resident = Resident(train_set, dev)
        soft_dev = soft_labels.to(dev) if soft_labels is not None else None
        prepare(model, teacher, dev)
    try:
        for epoch in range(start_epoch, config.epochs):
            t_epoch = time.perf_counter()
            model.train()
            perm = torch.randperm(n, generator=gen)
            if fast:
                total, seen = _device_epoch(model, opt, sched, resident, perm, config, gen, dev, teacher, soft_dev)
                total = float(total)   # the epoch's one read-back
                if not math.isfinite(total):
                    raise DNTKError(f"training loss became non-finite in epoch {epoch + 1}; lower the learning rate "
                                    f"(now {lr}) or use --optimizer adamw")
            else:
                total, seen = _classic_epoch(model, opt, sched, train_set, perm, config, gen, device, images,
                                             teacher, soft_labels, epoch, lr)
            due = val_set is not None and ((epoch + 1) % max(1, config.eval_every) == 0 or epoch + 1 == config.epochs)
            acc = evaluate(model, val_set, device=device)[0] if due else None
            history.append({"epoch": epoch + 1, "train_loss": total / max(seen, 1), "val_accuracy": acc,
                            "lr": sched.get_last_lr()[0], "seconds": time.perf_counter() - t_epoch})
            if config.select == "best" and acc is not None and acc > best[0]:
                best = (acc, epoch + 1)
                atomic_save({"model": model.state_dict(), "val_accuracy": acc, "epoch": epoch + 1}, out_dir / "best.pt")
            elif config.select == "last" and epoch + 1 == config.epochs:
                best = (acc if acc is not None else -1.0, epoch + 1)
                atomic_save({"model": model.state_dict(), "val_accuracy": acc, "epoch": epoch + 1}, out_dir / "best.pt")
            atomic_save({"model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                          "generator": gen.get_state(), "epoch": epoch + 1, "history": history, "best": list(best),
                          "config": cfg_json}, last)
            atomic_json(history, out_dir / "history.json", indent=1)
            bar.update(1)
            bar.set_postfix(loss=f"{history[-1]['train_loss']:.3f}", val_acc="-" if acc is None else f"{acc:.3f}")
            if max_seconds is not None and time.perf_counter() - t0 > max_seconds and epoch + 1 < config.epochs:
                break
    finally:
        bar.close()
        if fast:
            release(model, teacher, dev)
    if history and read_json(out_dir / "history.json", what="writing it again from last.pt") != history:
        atomic_json(history, out_dir / "history.json", indent=1)   # a torn or lost history.json is healed
    finished = bool(history) and history[-1]["epoch"] == config.epochs
    kept = load_or_none(out_dir / "best.pt", trusted=False, what="writing it again from last.pt")
    if kept is None and finished and config.select == "last":   # the final weights are the model's (from last.pt)
        atomic_save({"model": model.state_dict(), "val_accuracy": None, "epoch": config.epochs}, out_dir / "best.pt")
    elif kept is not None:
        model.load_state_dict(kept["model"])
    accuracy = best[0] if best[0] >= 0 else None
    return TrainResult(model, accuracy, best[1], history, time.perf_counter() - t0, resumed_from)



def training_seconds(out_dir) -> float | None:
    """Wall seconds the training in ``out_dir`` took, summed over its epochs (history.json), across
    resumptions; None when there is no history or an epoch was recorded without its time (older runs)."""
    history = read_json(Path(out_dir) / "history.json")
    if not isinstance(history, list) or not history or any("seconds" not in h for h in history):
        return None
    return float(sum(h["seconds"] for h in history))
