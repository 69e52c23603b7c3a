"""The device training pipeline (``TrainConfig.pipeline = "device"``; ``"auto"`` picks it on CUDA): what
keeps a GPU busy instead of waiting on the host.

- The decoded uint8 images live on the training device (copied once per :func:`~dntk.training.train`
  call) and are normalised there; a batch is a gather, not a host-to-device copy.
- Augmentation is batched: one set of random draws per batch (crop offsets, RandomResizedCrop boxes,
  flips, CutMix's permutation, λ and box) from the run's CPU generator — so a batch is augmented the same
  on any device, and resuming restores one generator — moved to the device pinned and non-blocking; the
  crops themselves run on the device (an indexed gather; ``roi_align`` for RandomResizedCrop).
- No host synchronisation inside the step loop: no ``.item()``, no boolean masks, no data-dependent
  Python branch on a device value. The loss is summed on the device and read once per epoch, where the
  non-finite check is made (so a diverged epoch is reported at its end, not at its first bad batch).
- On CUDA, bf16 autocast and channels_last for the forward and the loss (BatchNorm and the softmax /
  KL / cross-entropy stay in float32 under autocast); the trained model is handed back in the default
  memory format. On the CPU the same code runs in float32.

The draws follow the same distributions as the classic per-image loop (:func:`dntk.training.loop.
augment_batch`; tests compare them), but not the same random stream: the two pipelines train different
(equally distributed) models from one seed. The classic pipeline stays the CPU default so that CPU
results are unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import samples
from ..errors import DNTKError

PIPELINES = ("auto", "classic", "device")


def resolve_pipeline(pipeline: str, device, data) -> str:
    """``classic`` or ``device`` for a TrainConfig.pipeline, the training device and the training set:
    ``auto`` is ``device`` on CUDA for image sets (uint8 images that can live on the GPU), else
    ``classic``; ``device`` on data that is not an image set is refused."""
    if pipeline not in PIPELINES:
        raise DNTKError(f"unknown training pipeline {pipeline!r}; use auto, classic or device")
    resident = _resident_kind(data) is not None
    if pipeline == "auto":
        return "device" if torch.device(device).type == "cuda" and resident else "classic"
    if pipeline == "device" and not resident:
        raise DNTKError("the device training pipeline keeps the images [n, c, h, w] (uint8 of an ImageSet, or the "
                        f"normalised float32 of a DistilledSet) on the device; this training set is a "
                        f"{type(data).__name__} without them — use pipeline='classic'")
    return pipeline


def _resident_kind(data) -> str | None:
    """``uint8`` (an ImageSet: normalised on the device with its mean/std), ``float`` (normalised float
    images [n, c, h, w], as a DistilledSet holds) or None (token ids, tuples, ...: classic only)."""
    images = getattr(data, "images", None)
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        return None
    if images.dtype == torch.uint8 and hasattr(data, "mean") and hasattr(data, "std"):
        return "uint8"
    return "float" if images.is_floating_point() else None


def _pinned(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on ``device`` without a host synchronisation (pinned, non-blocking) on CUDA."""
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


# ---------------------------------------------------------------- batched random draws (CPU generator)

def crop_boxes_batched(B: int, h: int, w: int, gen: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                       tries: int = 10) -> torch.Tensor:
    """torchvision's RandomResizedCrop box for B images at once: per image up to ``tries`` draws of an
    area fraction ~ U(scale) and a log-uniform aspect ratio, the first that fits kept, else the central
    crop of the clamped ratio — the distribution of :func:`dntk.training.loop.crop_boxes`, drawn as
    tensors (float64, Python's round-half-even as ``torch.round``). Returns float32 [B, 4] (left, top,
    right, bottom) in pixel-edge coordinates."""
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    u = torch.rand(B, tries, generator=gen, dtype=torch.float64)
    v = torch.rand(B, tries, generator=gen, dtype=torch.float64)
    target = h * w * (scale[0] + (scale[1] - scale[0]) * u)
    ar = torch.exp(lo + (hi - lo) * v)
    cw, ch = torch.round(torch.sqrt(target * ar)), torch.round(torch.sqrt(target / ar))
    ok = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = ok.to(torch.int8).argmax(1, keepdim=True)           # the first try that fits (0 when none does)
    found = ok.any(1)
    r = w / h
    fw, fh = (w, round(w / ratio[0])) if r < ratio[0] else ((round(h * ratio[1]), h) if r > ratio[1] else (w, h))
    fw, fh = min(fw, w), min(fh, h)
    cw = torch.where(found, cw.gather(1, first).squeeze(1), torch.full((B,), float(fw), dtype=torch.float64))
    ch = torch.where(found, ch.gather(1, first).squeeze(1), torch.full((B,), float(fh), dtype=torch.float64))
    pos = torch.rand(B, 2, generator=gen, dtype=torch.float64)
    top = torch.where(found, torch.floor(pos[:, 0] * (h - ch + 1)), torch.full((B,), float((h - fh) // 2), dtype=torch.float64))
    left = torch.where(found, torch.floor(pos[:, 1] * (w - cw + 1)), torch.full((B,), float((w - fw) // 2), dtype=torch.float64))
    return torch.stack([left, top, left + cw, top + ch], 1).float()


@dataclass
class Draws:
    """One batch's random draws, on the CPU; :meth:`to` moves the tensors to the device without a sync.
    index [B]: rows of the training set; offsets [B, 2] (dy, dx) for crop/shift; boxes [B, 4] for
    RandomResizedCrop; flip [B] bool; CutMix: perm [B], box (y0, y1, x0, x1) and lam as Python numbers."""

    index: torch.Tensor
    offsets: torch.Tensor | None = None
    boxes: torch.Tensor | None = None
    flip: torch.Tensor | None = None
    perm: torch.Tensor | None = None
    box: tuple | None = None
    lam: float = 1.0

    def to(self, device: torch.device) -> "Draws":
        move = (lambda t: None if t is None else _pinned(t, device))
        return Draws(move(self.index), move(self.offsets), move(self.boxes), move(self.flip), move(self.perm),
                     self.box, self.lam)


def pad_of(mode: str, h: int) -> int:
    return max(1, h // 8) if mode == "crop_flip" else 1


def draw_batch(index: torch.Tensor, shape, augment: str, mix: str, gen: torch.Generator) -> Draws:
    """The random draws of one batch of ``index`` [B] images of ``shape`` (c, h, w), from ``gen`` (CPU)."""
    B = index.numel()
    _, h, w = shape
    d = Draws(index)
    if augment in ("crop_flip", "shift"):
        p = pad_of(augment, h)
        d.offsets = torch.randint(0, 2 * p + 1, (B, 2), generator=gen)
    elif augment in ("rrc_flip", "rrc"):
        d.boxes = crop_boxes_batched(B, h, w, gen)
    elif augment != "none":
        raise DNTKError(f"unknown augmentation {augment!r}; use crop_flip, rrc_flip, rrc, shift or none")
    if augment in ("crop_flip", "rrc_flip"):
        d.flip = torch.rand(B, generator=gen) < 0.5
    if mix == "cutmix":
        lam = float(torch.rand(1, generator=gen))
        d.perm = torch.randperm(B, generator=gen)
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy, cx = int(torch.randint(0, h, (1,), generator=gen)), int(torch.randint(0, w, (1,), generator=gen))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        d.box, d.lam = (y0, y1, x0, x1), 1.0 - (y1 - y0) * (x1 - x0) / (h * w)
    elif mix != "none":
        raise DNTKError(f"unknown mix {mix!r}; use 'none' or 'cutmix'")
    return d


# ---------------------------------------------------------------- the augmentations, on the device

def shift_crop(x: torch.Tensor, offsets: torch.Tensor, pad: int, mode: str) -> torch.Tensor:
    """Every image of x [B, c, h, w] padded by ``pad`` (reflect for crop_flip; for shift the batch's minimum,
    as the classic loop) and cut at its offset (dy, dx) of ``offsets`` [B, 2] — one gather for the batch."""
    B, c, h, w = x.shape
    if mode == "crop_flip":
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    else:   # filled with the batch minimum as a tensor: no read-back
        padded = x.amin().expand(B, c, h + 2 * pad, w + 2 * pad).clone()
        padded[:, :, pad:pad + h, pad:pad + w] = x
    W = w + 2 * pad
    rows = offsets[:, 0:1] + torch.arange(h, device=x.device)       # [B, h]
    cols = offsets[:, 1:2] + torch.arange(w, device=x.device)       # [B, w]
    flat = (rows[:, :, None] * W + cols[:, None, :]).view(B, 1, h * w).expand(B, c, h * w)
    return padded.reshape(B, c, -1).gather(2, flat).view(B, c, h, w)


def resized_crop(x: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each image's box [B, 4] resized to the full h × w: :func:`dntk.training.loop.resize_boxes`, with the
    roi indices made on the device."""
    from torchvision.ops import roi_align

    B, _, h, w = x.shape
    rois = torch.cat([torch.arange(B, device=x.device, dtype=x.dtype)[:, None], boxes.to(x.dtype)], 1)
    return roi_align(x, rois, output_size=(h, w), spatial_scale=1.0, sampling_ratio=1, aligned=True)


def augment_on_device(x: torch.Tensor, d: Draws, augment: str) -> torch.Tensor:
    """x: normalised float [B, c, h, w] on the device; ``d``: the batch's draws on the same device."""
    if augment in ("crop_flip", "shift"):
        x = shift_crop(x, d.offsets, pad_of(augment, x.shape[-2]), augment)
    elif augment in ("rrc_flip", "rrc"):
        x = resized_crop(x, d.boxes)
    if d.flip is not None:
        x = torch.where(d.flip[:, None, None, None], x.flip(-1), x)
    if d.perm is not None:
        y0, y1, x0, x1 = d.box
        x = x.clone()
        x[:, :, y0:y1, x0:x1] = x[d.perm][:, :, y0:y1, x0:x1]
    return x


# ---------------------------------------------------------------- one training step

class Resident:
    """A training set's images and labels on the device: uint8 normalised per batch there, or float images
    already normalised."""

    def __init__(self, data, device: torch.device):
        self.kind = _resident_kind(data)
        self.images = data.images.to(device)
        self.labels = data.labels.to(device)
        if self.kind == "uint8":
            self.mean = torch.tensor(data.mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
            self.std = torch.tensor(data.std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.shape = tuple(data.images.shape[1:])

    def batch(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised float32 [B, c, h, w], labels [B]) of device indices — the values ``data.tensors`` gives."""
        if self.kind == "float":
            return self.images[index].float(), self.labels[index]
        return (self.images[index].float().div_(255.0) - self.mean) / self.std, self.labels[index]


def autocast(device: torch.device):
    """bf16 autocast on CUDA; a no-op elsewhere (float32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def step_loss(model: nn.Module, data: Resident, d: Draws, config, *, teacher=None, soft_labels=None) -> torch.Tensor:
    """The loss of one batch (draws ``d`` already on the device): gather, normalise, augment, mix,
    forward (bf16 autocast on CUDA), loss — all on the device, nothing read back."""
    x, y = data.batch(d.index)
    x = augment_on_device(x, d, config.augment)
    device = x.device
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device):
        out = samples.call(model, x)
        if soft_labels is not None or teacher is not None:
            T = config.soft_label_temperature
            if teacher is not None:
                with torch.no_grad():
                    prob = F.softmax(samples.call(teacher, x).float() / T, 1)
            else:
                prob = F.softmax(soft_labels[d.index] / T, 1)
                if d.perm is not None:
                    prob = d.lam * prob + (1 - d.lam) * prob[d.perm]
            return F.kl_div(F.log_softmax(out.float() / T, 1), prob, reduction="batchmean") * T * T
        loss = F.cross_entropy(out.float(), y, label_smoothing=config.label_smoothing)
        if d.perm is not None:
            loss = d.lam * loss + (1 - d.lam) * F.cross_entropy(out.float(), y[d.perm],
                                                                label_smoothing=config.label_smoothing)
        return loss


def prepare(model: nn.Module, teacher, device: torch.device):
    """channels_last on CUDA for the model (and the relabelling teacher)."""
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher.to(memory_format=torch.channels_last)


def release(model: nn.Module, teacher, device: torch.device):
    """Back to the default memory format (what the rest of dntk, and a user, expects of a model)."""
    if device.type == "cuda":
        model.to(memory_format=torch.contiguous_format)
        if teacher is not None:
            teacher.to(memory_format=torch.contiguous_format)
