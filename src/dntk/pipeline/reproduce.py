"""``dntk reproduce``: the paper's setting end to end, every stage's cost counted, one report.

Two named settings (:data:`SETTINGS`), the same command on any ImageFolder copy of ImageNette:

- ``paper160`` — the paper's: Resize 176 → CenterCrop 160, ResNet-18 with the ImageNet stem, WMDD at
  IPC 50 with WMDD's own 2,000 iterations (lr 0.25, BN weight 3), students under WMDD's protocol
  (300 epochs), all validation images. Sized for a GPU.
- ``cpu64`` — the same pipeline CPU-sized: 64 px, 14 teacher epochs, WMDD 100 iterations, a
  100-epoch WMDD-protocol student, 1,000 validation images.

What it runs, in order (each step resumes from OUT; this module only orchestrates):

1. ``dntk run`` with the teacher as base model and Algorithm 1 (stage 3): Figures 2–5, the selection
   baselines and Algorithm 1 at s = m/20, m/50, m/100 (Figure 3's rows);
2. ``dntk run`` with the distilled-data student as base model: Figure 1 with both base models;
3. theory diagnostics (:func:`dntk.spectral.subspace_diagnostics`) for the WMDD, random, k-center and
   top-PCA subspaces, Σ_g estimated from real training images outside every subset, Theorem 3.3 on the
   held-out validation features;
4. DNTK against the exact eNTK on a subset small enough for it (:func:`dntk.features.sliced_class_kernels`):
   every projection dimension and Algorithm 1 at 20×/50×/100× against the exact eNTK model;
5. cost accounting (:func:`dntk.resources.model_flops`, :func:`~dntk.resources.exact_entk_cost`): per stage
   Jacobians, FLOPs, bytes, wall time and peak memory, and the uncompressed exact eNTK of all training ×
   test images extrapolated from the measured unit costs;
6. ``reproduce.json`` and ``report.md`` (:func:`dntk.report.write_reproduce_report`), with the paper's five
   claims judged by :mod:`dntk.report.claims`.

Steps 3–4 are :mod:`dntk.pipeline.diagnostics`, step 5 and the probe :mod:`dntk.pipeline.costs`; this
module holds the settings and the order.

:func:`probe` measures the unit costs of a setting on a few images and extrapolates every stage — how a
CPU states what the 160 px run costs without running it.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import report
from ..config import RunConfig
from ..data import load_configured
from ..errors import DNTKError
from ..projection import make as make_projector
from ..report import claims
from ..lock import hold
from ..resources import StageTimer
from ..store import FeatureStore, atomic_json, cached, digest
from ..training import load_or_train_teacher
from . import costs as costs_
from .costs import probe
from .diagnostics import exact_subset, theory_diagnostics
from .prepare import check_out, feature_folder, feature_key
from .run import run
from .stage1 import training_points
from .stage3 import FIG3_COMPRESSIONS

__all__ = ["ReproduceConfig", "SETTINGS", "EXTRA", "OWN_OPTIONS", "reproduce", "probe"]

SETTINGS = {
    # paper160's teacher: batch 512 at lr 0.2 (0.05 per 128, the linear scaling rule) — a GPU-sized batch for
    # the device pipeline (--train-pipeline auto picks it on CUDA); the rest of the recipe is the library's
    "paper160": {"image_size": 160, "resize": 176, "model": "resnet18", "stem": "imagenet", "epochs": 60,
                 "train_batch_size": 512, "lr": 0.2,
                 "distill": "wmdd", "ipc": 50, "wmdd_iterations": 2000, "wmdd_lr": 0.25, "wmdd_bn_weight": 3.0,
                 "wmdd_classes_per_step": 10, "student_protocol": "wmdd", "student_epochs": 300, "n_test": None,
                 "curve_seeds": 3},
    "cpu64": {"image_size": 64, "resize": None, "model": "resnet18", "stem": "imagenet", "epochs": 14,
              "distill": "wmdd", "ipc": 50, "wmdd_iterations": 100, "wmdd_lr": 0.05, "wmdd_bn_weight": 1.0,
              "wmdd_classes_per_step": 1, "student_protocol": "wmdd", "student_epochs": 100, "n_test": 1000,
              "curve_seeds": 3},
}
EXTRA = {"paper160": {"theory_images": 4000, "exact_train": 100, "exact_test": 200, "exact_ks": (256, 1024, 4096)},
         "cpu64": {"theory_images": 2000, "exact_train": 100, "exact_test": 200, "exact_ks": (256, 1024, 4096)}}
COMPRESSIONS = FIG3_COMPRESSIONS   # Algorithm 1's m/s (Figure 3 always evaluates them)


OWN_OPTIONS = {"dataset", "data_root", "out", "device", "seed", "progress"}   # ReproduceConfig's fields, not --set


@dataclass
class ReproduceConfig:
    """setting: a key of SETTINGS; overrides: flat RunConfig options replacing the setting's (e.g.
    n_test=500); theory_images / exact_train / exact_test: None = the setting's (EXTRA); exact: run
    step 4; exact_memory_bytes: gradients the exact subset holds at once (more = fewer passes);
    report_dir: where report.md and its figures go (None: OUT/report)."""

    data_root: str
    setting: str = "cpu64"
    dataset: str = "folder"
    out: str = "dntk-reproduce"
    device: str = "cpu"
    seed: int = 0
    progress: bool = True
    overrides: dict = field(default_factory=dict)
    theory_images: int | None = None
    exact_train: int | None = None
    exact_test: int | None = None
    exact: bool = True
    exact_memory_bytes: int = 6 << 30
    report_dir: str | None = None

    def check(self) -> None:
        if self.setting not in SETTINGS:
            raise DNTKError(f"unknown setting {self.setting!r}; use one of {', '.join(SETTINGS)}")
        own = sorted(set(self.overrides) & OWN_OPTIONS)
        if own:
            raise DNTKError(f"{', '.join(own)} {'are settings' if len(own) > 1 else 'is a setting'} of dntk reproduce "
                            f"itself, not an override: pass {' '.join('--' + o.replace('_', '-') for o in own)} "
                            f"(Python: ReproduceConfig({', '.join(o + '=...' for o in own)}))")
        for name in ("theory_images", "exact_train", "exact_test"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise DNTKError(f"--{name.replace('_', '-')} {v!r} must be an integer ≥ 1")
        if not isinstance(self.exact_memory_bytes, int) or self.exact_memory_bytes < 1:
            raise DNTKError(f"exact_memory_bytes {self.exact_memory_bytes!r} must be a positive number of bytes")
        if not Path(self.data_root).is_dir():
            raise DNTKError(f"--data-root {self.data_root!r} is not a folder; point it at an ImageFolder copy of "
                            "ImageNette (train/ and val/)")

    def extra(self, name: str):
        v = getattr(self, name, None)
        return EXTRA[self.setting][name] if v is None else v

    def run_config(self, **more) -> RunConfig:
        opts = dict(SETTINGS[self.setting])
        opts.update(self.overrides)
        opts.update(more)
        return RunConfig.from_options(dataset=self.dataset, data_root=self.data_root, out=self.out,
                                      device=self.device, seed=self.seed, progress=self.progress, **opts).resolved()


def reproduce(rc: ReproduceConfig) -> dict:
    """Run every step (see the module docstring); returns the summary also written to
    ``OUT/reproduce.json`` (and to the report folder), with ``report.md`` beside its figures. The
    output folder's lock (:mod:`dntk.lock`) is held throughout."""
    rc.check()
    rc.run_config()   # every override checked before OUT (and its lock file) is made
    check_out(rc.out)
    with hold(rc.out, rank=int(os.environ.get("RANK", "0"))):
        return _reproduce(rc)


def _reproduce(rc: ReproduceConfig) -> dict:
    rc.check()
    out = Path(rc.out)
    out.mkdir(parents=True, exist_ok=True)
    report_dir = Path(rc.report_dir) if rc.report_dir else out / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    st = StageTimer()
    log = print if rc.progress else (lambda *a, **k: None)

    # 1-2: the two runs (teacher base with stage 3; student base for Figure 1)
    cfg_t = rc.run_config(base_model="teacher", gradient_distill="local-global")
    res_t = run(cfg_t).to_dict()   # each run times its own stages (not nested here: the peaks stay exact)
    for name in ("figure2.png", "figure3.png", "figure5.png"):
        _copy(out / name, report_dir / name)
    _copy(out / "figure4-class0.png", report_dir / "figure4.png")   # the first class (tench on ImageNette)
    _copy(out / "figure1.png", report_dir / "figure1_teacher_only.png")
    atomic_json(res_t, report_dir / "results_teacher_base.json")
    cfg_s = rc.run_config(base_model="student")
    res_s = run(cfg_s).to_dict()
    _copy(out / "figure1.png", report_dir / "figure1.png")
    atomic_json(res_s, report_dir / "results_student_base.json")
    cfg = cfg_t
    log("reproduce: both runs done; theory diagnostics next")

    # shared context: data, teacher, projector, training points (all cached by the runs)
    train_set, test_set = load_configured(cfg.data, cache_dir=out / "cache", progress=False)
    teacher = load_or_train_teacher(cfg.teacher, cfg.data.dataset, cfg.data.image_size, train_set, out,
                                    seed=cfg.seed, device=cfg.device, progress=False)
    model = teacher.model.to(cfg.device).eval()
    k = cfg.features.resolved_k(model)
    projector = make_projector(cfg.features.projector, k=k, seed=cfg.seed)
    key = feature_key(teacher.checksum, cfg.features.projector, k, cfg.seed)

    stores: dict[str, set] = {}   # the feature folders each step used (their bytes are that step's)

    def features(X, purpose, name="train", k_=k):
        """The teacher's projected features of X (dimension k_) through their store; recorded under ``purpose``."""
        proj = projector if k_ == k else make_projector(cfg.features.projector, k=k_, seed=cfg.seed)
        folder = feature_folder(out, name, feature_key(teacher.checksum, cfg.features.projector, k_, cfg.seed), X)
        store = FeatureStore(folder, cfg.features.feature_chunk)
        store.extract(model, X, proj, identity={"model": teacher.checksum}, batch_size=cfg.features.batch_size,
                      device=cfg.device, progress=rc.progress)
        stores.setdefault(purpose, set()).add(store.folder)
        return store.read(projector=proj)

    points = training_points(cfg.distill, cfg.kernel.m, train_set, teacher=model, teacher_checksum=teacher.checksum,
                             seed=cfg.seed, out_dir=out, device=cfg.device, progress=False,
                             features_cfg=cfg.features, kernel_cfg=cfg.kernel)
    X_test, y_test = test_set.tensors()

    # 3: theory diagnostics
    with st.time("theory"):
        def compute_theory():
            found = theory_diagnostics(rc, cfg, train_set, points, X_test, y_test, model, features)
            # the feature folders it used, so a later invocation that finds the diagnostics cached still counts their bytes
            return {**found, "store_folders": sorted(p.name for p in stores.get("theory", ()))}

        theory = cached(out / f"theory-{digest(key, digest(points.images), digest(X_test), rc.extra('theory_images'))}.pt",
                        compute_theory)
    atomic_json(theory, report_dir / "theory.json")

    # 4: DNTK against the exact eNTK on a subset
    exact = None
    if rc.exact:
        with st.time("exact_subset"):
            exact = exact_subset(rc, cfg, points, test_set, model, teacher.checksum, out, features)
        atomic_json(exact, report_dir / "exact.json")

    # 5: costs (wall time and peak memory from the ledger: the longest invocation of each stage, so a
    # stage found cached in this invocation keeps the cost it had when it was computed)
    book = costs_.ledger(out, res_t, res_s, st)
    run_stores = [feature_folder(out, name, feature_key(checksum, cfg.features.projector, k, cfg.seed), X)
                  for checksum in (teacher.checksum, res_s["base_model"]["checksum"])
                  for name, X in (("train", points.images), ("test", X_test))]
    if "theory" not in stores and "store_folders" in theory:   # cached: the folders it recorded when computed
        stores["theory"] = {out / name for name in theory["store_folders"]}
    costs = costs_.stage_costs(cfg, res_t, res_s, book, model, train_set, test_set, exact, out, k,
                   {**{p_: sorted(v) for p_, v in stores.items()},
                    "run": sorted(set(run_stores) | stores.get("run", set()))})
    summary = {"setting": rc.setting, "settings": SETTINGS[rc.setting] | rc.overrides,
               "extra": {n: rc.extra(n) for n in EXTRA[rc.setting]}, "paper": claims.PAPER,
               "teacher_base": _headline(res_t), "student_base": _headline(res_s),
               "figure1": {"teacher": res_s["curves"].get("teacher"), "student": res_s["curves"]["projected"]},
               "algorithm1": claims.algorithm1_rows(res_t, COMPRESSIONS), "spectral_optimum": claims.spectral_optimum(res_t), "theory": theory, "exact": exact, "costs": costs,
               "claims": claims.claims(res_t, res_s, costs),
               "device": cfg.device, "cuda": torch.cuda.get_device_name(0) if "cuda" in str(cfg.device) else None}
    atomic_json(summary, out / "reproduce.json")
    atomic_json(summary, report_dir / "reproduce.json")
    path = report.write_reproduce_report(summary, report_dir)
    log(f"wrote {out / 'reproduce.json'} and {path}")
    return summary


def _copy(src: Path, dst: Path) -> None:
    if src.exists():
        shutil.copyfile(src, dst)


def _headline(res: dict) -> dict:
    return {"base_model": res["base_model"], "teacher_accuracy": res["teacher"]["test_accuracy"],
            "kernel_model": res["kernel_model"], "kernel_model_teacher": res.get("kernel_model_teacher"),
            "distillation": res.get("distillation"), "counts": res["counts"], "projector": res["projector"],
            "timings_s": res["timings_s"]}
