"""WMDD — dataset distillation via the Wasserstein metric (Liu et al., ICCV 2025), a clean CPU/GPU
implementation (no patched PyTorch).

Per class c:
1. teacher penultimate features of the class's real images (eval mode);
2. a free-support Wasserstein barycenter of those features with IPC support points (POT's
   ``free_support_barycenter``, uniform weights, initialised at the features of IPC random real
   images of the class);
3. per-class BatchNorm statistics: mean and variance of every BN layer's input over the class's
   real images;
4. IPC synthetic images initialised from real images of the class and optimised with Adam
   (β = (0.5, 0.9)) and a cosine learning-rate schedule under random-resized-crop / flip jitter to
   minimise  feature_weight · mean_i ‖f(x_i) − z_i‖₂  +  ce_weight · CE(teacher(x), c)
   + bn_weight · Σ_layers (‖μ_l(x) − μ_l^c‖₂ + ‖σ²_l(x) − σ²_l^c‖₂),
   where z_i are the barycenter support points (image i matched to point i).

Defaults: Adam β and the jitter follow WMDD's recover script. Its lr 0.25 with r_bn 3.0 is replaced by
lr 0.05 and bn_weight 1.0: on ImageNette (64 px) lr 0.25 drove the images off the data manifold within
60 steps (the BN loss rose 110 → 160) and, at WMDD's own 2,000 steps, gave the worst kernel model at
IPC 50 and the worst students at both IPCs of every variant measured. ``iterations`` defaults to 200 for CPU budgets; WMDD itself runs
2,000, which takes ≈ 35 s per (IPC, seed) on one H200 with ``classes_per_step = C`` (all classes in one
batch: the objective is summed per class, so each class gets exactly the gradient it gets alone).

What it buys the per-class NTK kernel model (benchmarks/bench_distill.py, ImageNette 64 px, 6 seeds,
benchmarks/results/distill.json): at IPC 10 the 2,000-step sets beat a random real subset (fidelity
0.8716 ± 0.0027 vs 0.8651 ± 0.0057); at IPC 50 they tie (0.9217 ± 0.0022 vs 0.9221 ± 0.0017).
benchmarks/analyze_distill.py shows why IPC 50 has no room for it: picking the real images nearest to
k-means centres of the *NTK features of all real images* (an oracle that needs every Jacobian) gains
only +0.0010 over random there, WMDD's own space (penultimate features, their barycenter) nothing,
while picking the images the kernel model gets most wrong gains +0.0068. Representative points are
not what the kernel model lacks at 500 points; an objective on the kernel itself (KIP-style) is.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import samples
from ..data.images import ImageSet
from ..errors import DNTKError
from ..models import forward_with_penultimate, penultimate
from ..resources import peak_rss_mb, reset_peak_rss
from ..store import atomic_save, load, load_or_none, read_json
from .distilled import DistilledSet, check_ipc, save_distilled


@dataclass
class WMDDConfig:
    ipc: int = 10
    iterations: int = 200
    lr: float = 0.05
    feature_weight: float = 1.0
    ce_weight: float = 1.0
    bn_weight: float = 1.0
    barycenter_iterations: int = 50
    jitter: bool = True
    batch_features: int = 256
    seed: int = 0
    classes_per_step: int = 1   # classes optimised together in one batch: the same per-class objective
    #                             (see grouped_objective), far faster on a GPU; resume is per group
    precision: str = "float32"  # "bf16": the teacher's forward and backward under bf16 autocast (channels_last on
    #                             CUDA), the images, BN moments and losses in float32 — a GPU option whose effect
    #                             on the distilled sets is not measured yet, so not the default


def _settings(cfg: "WMDDConfig") -> dict:
    """The settings that key a WMDD result: asdict(cfg), without ``precision`` at its default (so sets
    computed before the field existed stay valid)."""
    d = asdict(cfg)
    if d.get("precision") == "float32":
        d.pop("precision")
    return d


def class_features(teacher: nn.Module, images, batch: int = 256) -> torch.Tensor:
    """Penultimate features [n, d] (the input of the last Linear) of normalised images [n, c, h, w] —
    or of any sample batch of :mod:`dntk.samples` — in eval mode, no grad."""
    teacher.eval()
    n = samples.count(images)
    with torch.no_grad():
        return torch.cat([penultimate(teacher, samples.take(images, slice(s, s + batch))) for s in range(0, n, batch)])


def barycenter(features: torch.Tensor, ipc: int, *, seed: int = 0, iterations: int = 50) -> torch.Tensor:
    """Free-support Wasserstein-2 barycenter with ``ipc`` uniformly weighted support points of the
    empirical measure of ``features`` [n, d]; support initialised at ipc random feature points."""
    import ot

    X = features.detach().double().cpu().numpy()
    n = X.shape[0]
    if ipc > n:
        raise DNTKError(f"ipc={ipc} support points for a class with {n} images; choose ipc ≤ {n}")
    rng = np.random.default_rng(seed)
    init = X[rng.choice(n, ipc, replace=False)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Z = ot.lp.free_support_barycenter([X], [np.full(n, 1.0 / n)], init, b=np.full(ipc, 1.0 / ipc),
                                          numItermax=iterations, stopThr=1e-7)
    return torch.from_numpy(np.asarray(Z)).float()


def wasserstein2(a: torch.Tensor, b: torch.Tensor) -> float:
    """Exact W2 distance between the uniform empirical measures on the rows of a and b."""
    import ot

    A, B = a.double().numpy(), b.double().numpy()
    M = ot.dist(A, B)
    return float(np.sqrt(ot.emd2(np.full(len(A), 1 / len(A)), np.full(len(B), 1 / len(B)), M)))


def bn_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


class _BNInputs:
    """Records the input of every BatchNorm layer during a forward."""

    def __init__(self, layers):
        self.values: list[torch.Tensor] = []
        self.handles = [l.register_forward_hook(lambda m, i, o: self.values.append(i[0])) for l in layers]

    def remove(self):
        for h in self.handles:
            h.remove()


def class_bn_statistics(teacher: nn.Module, images: torch.Tensor, batch: int = 256) -> list[tuple]:
    """Per BN layer, (mean, variance) of its input over all ``images`` [n, c, h, w] (eval mode),
    accumulated exactly over batches from per-channel sums of x and x²."""
    return class_statistics(teacher, images, batch)[1]


def class_statistics(teacher: nn.Module, images: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, list]:
    """One pass over ``images``: (penultimate features [n, d], per-BN-layer (mean, variance) of the
    layer's input) — what WMDD needs from a class's real images."""
    rec = _BNInputs(bn_layers(teacher))
    sums: list[list] = []
    feats = []
    teacher.eval()
    try:
        with torch.no_grad():
            for s in range(0, images.shape[0], batch):
                rec.values.clear()
                feats.append(forward_with_penultimate(teacher, images[s:s + batch])[1])
                for i, x in enumerate(rec.values):
                    dims = [0] + list(range(2, x.dim()))
                    part = [x.double().sum(dims), (x.double() ** 2).sum(dims), x.numel() // x.shape[1]]
                    if i == len(sums):
                        sums.append(part)
                    else:
                        sums[i] = [a + b for a, b in zip(sums[i], part)]
    finally:
        rec.remove()
    stats = []
    for sx, sxx, n in sums:
        mean = sx / n
        stats.append((mean.float(), (sxx / n - mean ** 2).clamp_min(0).float()))
    return torch.cat(feats), stats


def stack_bn_targets(stats: list, device="cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """G classes' per-layer (mean, var) → per layer (mean [G, ch], var [G, ch]) on ``device``."""
    if not stats or not stats[0]:
        return []
    return [(torch.stack([s[i][0] for s in stats]).to(device), torch.stack([s[i][1] for s in stats]).to(device))
            for i in range(len(stats[0]))]


def _jitter(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random resized crop (scale 0.5–1) back to the input size, and a random horizontal flip —
    differentiable in x."""
    h, w = x.shape[-2:]
    scale = float(torch.empty(1).uniform_(0.5, 1.0, generator=gen))
    ch, cw = max(2, int(round(h * scale ** 0.5))), max(2, int(round(w * scale ** 0.5)))
    top = int(torch.randint(0, h - ch + 1, (1,), generator=gen))
    left = int(torch.randint(0, w - cw + 1, (1,), generator=gen))
    out = F.interpolate(x[:, :, top:top + ch, left:left + cw], size=(h, w), mode="bilinear", align_corners=False)
    if bool(torch.rand(1, generator=gen) < 0.5):
        out = out.flip(-1)
    return out


def _records(parts: torch.Tensor) -> list:
    """Per-class loss records from the [G, 4] (feature, ce, bn, total) tensor of grouped_objective."""
    return [{"feature": float(a), "ce": float(b), "bn": float(c), "total": float(t)} for a, b, c, t in parts.tolist()]


def grouped_objective(teacher, x, classes, supports, bn_targets, cfg: WMDDConfig, layers, *,
                      lazy: bool = False) -> tuple[torch.Tensor, list]:
    """The WMDD loss summed over G classes optimised in one batch.

    x: [G·ipc, c, h, w], class g's images at rows g·ipc … (g+1)·ipc − 1; classes: G class indices;
    supports: [G, ipc, d] barycenter points matched to the images; bn_targets: per BN layer
    (mean [G, ch], var [G, ch]) from ``stack_bn_targets``. Every term is computed per class (BN
    moments over that class's images only), so the gradient for class g's pixels is exactly that of
    its own loss: optimising G classes together is optimising each alone. Returns the total and one
    record of loss parts per class — or, ``lazy``, the parts as a detached [G, 4] tensor (feature, ce, bn,
    total) left on the device, read back by nobody (what the optimisation loop keeps: no host sync a step)."""
    G, ipc = len(classes), supports.shape[1]
    rec = _BNInputs(layers) if cfg.bn_weight and layers else None
    try:
        logits, feats = forward_with_penultimate(teacher, x)
    finally:
        if rec:
            rec.remove()
    logits, feats = logits.float(), feats.float()   # the losses in float32 (also under bf16 autocast)
    l_feat = (feats.view(G, ipc, -1) - supports).norm(dim=2).mean(1)                      # [G]
    target = torch.as_tensor(classes, device=x.device).repeat_interleave(ipc)
    l_ce = F.cross_entropy(logits, target, reduction="none").view(G, ipc).mean(1)          # [G]
    l_bn = torch.zeros(G, device=x.device)
    if rec:
        for val, (mu, var) in zip(rec.values, bn_targets):
            v = val.float().view(G, ipc, *val.shape[1:])   # moments in float32 (also under bf16 autocast)
            dims = [1] + list(range(3, v.dim()))
            l_bn = l_bn + (v.mean(dims) - mu).norm(dim=1) + (v.var(dims, unbiased=False) - var).norm(dim=1)
    per_class = cfg.feature_weight * l_feat + cfg.ce_weight * l_ce + cfg.bn_weight * l_bn
    parts = torch.stack([l_feat, l_ce, l_bn, per_class], 1).detach()
    return per_class.sum(), (parts if lazy else _records(parts))


def wmdd_objective(teacher, x, target_class, support, bn_stats, cfg: WMDDConfig, layers) -> tuple[torch.Tensor, dict]:
    """The WMDD loss of one class's synthetic images x [ipc, c, h, w] (teacher in eval mode);
    bn_stats: the class's per-layer (mean, var)."""
    total, parts = grouped_objective(teacher, x, [target_class], support[None],
                                     stack_bn_targets([bn_stats], x.device), cfg, layers)
    return total, parts[0]


def class_targets(teacher, real: torch.Tensor, target_class: int, cfg: WMDDConfig, layers, device="cpu") -> dict:
    """What WMDD matches for one class, from its real images [n, c, h, w] (normalised):
    ``support`` [ipc, d] barycenter points, each matched to an initial image by an optimal
    assignment of features (Hungarian) so images travel as little as possible in feature space;
    ``stats`` the per-class BN statistics; ``init_indices`` [ipc] the initial real images."""
    from scipy.optimize import linear_sum_assignment

    gen = torch.Generator().manual_seed(cfg.seed * 1000 + target_class)
    feats, stats = class_statistics(teacher, real.to(device), cfg.batch_features)
    feats = feats.cpu()
    stats = [(m.cpu(), v.cpu()) for m, v in stats]
    support = barycenter(feats, cfg.ipc, seed=cfg.seed * 1000 + target_class, iterations=cfg.barycenter_iterations)
    init = torch.randperm(real.shape[0], generator=gen)[: cfg.ipc]
    _, cols = linear_sum_assignment(torch.cdist(feats[init].double(), support.double()).numpy())
    return {"support": support[torch.as_tensor(cols)], "stats": stats, "init_indices": init}


def optimise_group(teacher, init: torch.Tensor, classes: list[int], supports: torch.Tensor, stats: list,
                   cfg: WMDDConfig, layers, *, progress=False, device="cpu") -> tuple[torch.Tensor, list]:
    """Optimise the synthetic images of G classes together (Adam, β = (0.5, 0.9), cosine schedule,
    one jitter draw per step shared by the batch). init: normalised [G·ipc, c, h, w] (class-major);
    supports [G, ipc, d]. Returns the images [G·ipc, c, h, w] on the CPU and per-class records."""
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + 7919 * (1 + min(classes)) + len(classes))
    x = init.clone().to(device).requires_grad_(True)
    opt = torch.optim.Adam([x], lr=cfg.lr, betas=(0.5, 0.9))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, cfg.iterations))
    supports = supports.to(device)
    bn_targets = stack_bn_targets(stats, device)
    first = last = None
    label = f"wmdd class {classes[0]}" if len(classes) == 1 else f"wmdd classes {classes[0]}–{classes[-1]}"
    if cfg.precision not in ("float32", "bf16"):
        raise DNTKError(f"unknown WMDD precision {cfg.precision!r}; use float32 or bf16")
    dev = torch.device(device)
    mixed = cfg.precision == "bf16"
    if mixed and dev.type == "cuda":
        teacher.to(memory_format=torch.channels_last)
    for _ in tqdm(range(cfg.iterations), desc=label, disable=not progress, leave=False):
        xin = _jitter(x, gen) if cfg.jitter else x
        if mixed and dev.type == "cuda":
            xin = xin.contiguous(memory_format=torch.channels_last)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=mixed):
            loss, parts = grouped_objective(teacher, xin, classes, supports, bn_targets, cfg, layers, lazy=True)
        if first is None:
            first = parts
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        last = parts
    if mixed and dev.type == "cuda":
        teacher.to(memory_format=torch.contiguous_format)
    with torch.no_grad():   # the final losses in float32, whatever the precision of the steps
        _, final = grouped_objective(teacher, x, classes, supports, bn_targets, cfg, layers)
    if first is None:
        first = last = final
    else:   # the loop's loss parts, read back once at the end
        first, last = _records(first), _records(last)
    records = [{"initial_loss": a, "final_loss": b, "last_jittered_loss": c} for a, b, c in zip(first, final, last)]
    return x.detach().cpu(), records


def synthesize_class(teacher, real: torch.Tensor, target_class: int, cfg: WMDDConfig, layers, *, progress=False,
                     device="cpu") -> tuple[torch.Tensor, dict]:
    """Optimised synthetic images (normalised float [ipc, c, h, w]) for one class, and its record."""
    t = class_targets(teacher, real, target_class, cfg, layers, device)
    x, recs = optimise_group(teacher, real[t["init_indices"]], [target_class], t["support"][None], [t["stats"]],
                             cfg, layers, progress=progress, device=device)
    return x, {**recs[0], "init_indices": t["init_indices"].tolist()}


def class_blob_path(out_dir, c: int) -> Path:
    return Path(out_dir) / "classes" / f"class{c:04d}.pt"


def write_class_blob(out_dir, c: int, images: torch.Tensor, record: dict, cfg: WMDDConfig, teacher_checksum: str,
                     data_key: str | None = None):
    """Atomically store one class's finished images [ipc, c, h, w] and record (the resume unit), keyed by the
    settings, the teacher's checksum and the real images' content key (:func:`data_key`)."""
    path = class_blob_path(out_dir, c)
    blob = {"images": images, "record": record, "config": json.dumps(_settings(cfg), sort_keys=True),
            "teacher": teacher_checksum, "data": data_key}
    atomic_save(blob, path)
    return blob


def data_key(dataset) -> str:
    """Content key of the real images WMDD starts from and matches: pixels, labels and class names."""
    from ..store import digest

    return digest(dataset.images, dataset.labels, list(dataset.classes))


def _valid_blob(out_dir, c, cfg, teacher_checksum, data=None):
    path = class_blob_path(out_dir, c)
    blob = load_or_none(path, what="optimising this class again")   # a torn class file is redone, not a traceback
    if not isinstance(blob, dict) or blob.get("config") != json.dumps(_settings(cfg), sort_keys=True) \
            or blob.get("teacher") != teacher_checksum or blob.get("data") != data:
        return None
    return blob


def _finished(out_dir: Path, cfg, teacher_checksum: str, data=None):
    """The assembled set in out_dir when its manifest records these settings and this teacher, else None."""
    import json

    from .distilled import load_distilled

    manifest = out_dir / "manifest.json"
    if not (out_dir / "distilled.pt").exists() or not manifest.exists():
        return None
    rec = read_json(manifest, what="assembling the set again from its classes")
    if not isinstance(rec, dict) or load_or_none(out_dir / "distilled.pt", what="assembling it again") is None:
        return None
    if rec.get("settings") != json.loads(json.dumps(_settings(cfg))) or rec.get("teacher_checksum") != teacher_checksum \
            or rec.get("data") != data:
        return None
    return load_distilled(out_dir)


def wmdd(teacher: nn.Module, dataset: ImageSet, cfg: WMDDConfig, out_dir, *, progress: bool = True,
         device="cpu", teacher_checksum: str = "") -> DistilledSet:
    """Distil ``dataset`` to cfg.ipc images per class; resumable class by class (group by group when
    cfg.classes_per_step > 1) in ``out_dir``. The manifest's ``seconds`` is the optimisation time
    summed over classes, so a resumed run reports the whole cost, not the last sitting's."""
    if not isinstance(dataset, ImageSet):
        raise DNTKError(f"WMDD synthesises pixels, so it needs image data (an ImageSet: --dataset folder, imagenette "
                        f"or digits; dntk.data.ImageSet in Python); this data is "
                        f"{samples.describe(dataset.tensors(torch.arange(1))[0])}. Use --distill random, kcenter, "
                        "kernel-greedy or kernel-herding, which choose real samples")
    check_ipc(dataset, cfg.ipc)
    if cfg.classes_per_step < 1:
        raise DNTKError(f"classes_per_step must be ≥ 1, got {cfg.classes_per_step}")
    out_dir = Path(out_dir)
    (out_dir / "classes").mkdir(parents=True, exist_ok=True)
    layers = bn_layers(teacher)
    if not layers and cfg.bn_weight:
        warnings.warn("the teacher has no BatchNorm layers: the BN-statistics term is off", RuntimeWarning, stacklevel=2)
    teacher.to(device).eval()
    trainable = [p.requires_grad for p in teacher.parameters()]
    for p in teacher.parameters():
        p.requires_grad_(False)
    reset_peak_rss()
    C = dataset.num_classes
    groups = [list(range(s, min(C, s + cfg.classes_per_step))) for s in range(0, C, cfg.classes_per_step)]
    data = data_key(dataset)   # other real images (another size, an edited file) never reuse these classes
    blobs = {}
    computed = False
    try:
        for group in tqdm(groups, desc=f"WMDD ipc={cfg.ipc}", disable=not progress):
            found = {c: _valid_blob(out_dir, c, cfg, teacher_checksum, data) for c in group}
            if all(b is not None for b in found.values()):
                blobs.update(found)
                continue
            computed = True
            t0 = time.perf_counter()
            targets, inits = [], []
            for c in group:
                real, _ = dataset.tensors(torch.nonzero(dataset.labels == c).flatten())
                t = class_targets(teacher, real, c, cfg, layers, device)
                targets.append(t)
                inits.append(real[t["init_indices"]])
            x, recs = optimise_group(teacher, torch.cat(inits), group, torch.stack([t["support"] for t in targets]),
                                     [t["stats"] for t in targets], cfg, layers, progress=progress, device=device)
            seconds = (time.perf_counter() - t0) / len(group)
            for i, c in enumerate(group):
                rec = {**recs[i], "init_indices": targets[i]["init_indices"].tolist(), "seconds": seconds,
                       "device": str(device)}
                blobs[c] = write_class_blob(out_dir, c, x[i * cfg.ipc:(i + 1) * cfg.ipc], rec, cfg, teacher_checksum,
                                            data)
    finally:
        for p, flag in zip(teacher.parameters(), trainable):
            p.requires_grad_(flag)
    done = _finished(out_dir, cfg, teacher_checksum, data) if not computed else None
    if done is not None:   # every class was already optimised and assembled: keep the files (and their record)
        return done
    images = torch.cat([blobs[c]["images"] for c in range(C)])
    labels = torch.arange(C).repeat_interleave(torch.tensor([blobs[c]["images"].shape[0] for c in range(C)]))
    ds = DistilledSet.from_normalised(images, labels, dataset, method="wmdd")
    records = {dataset.classes[c]: blobs[c]["record"] for c in range(C)}
    manifest = {"method": "wmdd", "settings": _settings(cfg), "per_class": records,
                "seconds": sum(float(blobs[c]["record"].get("seconds", 0.0)) for c in range(C)),
                "devices": sorted({blobs[c]["record"].get("device", "cpu") for c in range(C)}),
                "peak_memory_mb": peak_rss_mb(), "teacher_checksum": teacher_checksum, "data": data}
    save_distilled(ds, out_dir, manifest)
    return ds
