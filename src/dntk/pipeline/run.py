"""``dntk run``: teacher → projected per-logit features → per-class KRR → fidelity metrics and Figure 1.

Every stage's output is kept in the output folder (teacher checkpoints, feature tensors keyed by
everything they depend on), written atomically, so an interrupted or repeated run resumes where it
stopped instead of recomputing.
"""

from __future__ import annotations

import hashlib
import json
import resource
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .. import metrics
from ..data import balanced_indices, load_splits
from ..errors import DNTKError, is_int_at_least
from ..features import empirical_ntk, gradient_features
from ..kernels import PerClassKRR, one_hot
from ..models import build_model, load_checkpoint
from ..projection import DEFAULT, NAMES
from ..projection import make as make_projector
from ..report import figure1
from ..training import TrainConfig, evaluate, train


def default_model(dataset: str) -> str:
    return "small_cnn" if dataset == "digits" else "resnet18"


def default_image_size(dataset: str) -> int:
    return 8 if dataset == "digits" else 64


def teacher_train_config(dataset: str, *, epochs=None, optimizer="sgd", lr=None, seed=0, batch_size=128) -> TrainConfig:
    """The teacher recipe shared by `dntk run`, `dntk train` and `dntk distill`."""
    if epochs is None:
        epochs = 30 if dataset == "digits" else 15
    return TrainConfig(epochs=epochs, optimizer=optimizer, lr=lr, seed=seed,
                       batch_size=batch_size, augment="shift" if dataset == "digits" else "crop_flip")


@dataclass
class RunConfig:
    """Settings of ``dntk run``; None means "pick the default for this dataset"."""

    dataset: str = "digits"
    data_root: str | None = None
    download: bool = False            # imagenette: fetch with torchvision when data_root lacks it
    model: str | None = None          # small_cnn for digits, resnet18 otherwise
    checkpoint: str | None = None     # None: train a teacher (cached in out/teacher)
    image_size: int | None = None     # 8 for digits, 64 otherwise
    stem: str = "auto"                # ResNet-18 stem: auto / small / imagenet
    projector: str = DEFAULT
    k: int | None = None              # min(4096, P // 2)
    m: int | None = None              # 500, capped by the training set
    n_test: int | None = None         # all of the test split
    device: str = "cpu"
    seed: int = 0
    out: str = "dntk-out"
    exact: bool = False
    ridge: float = 1e-4
    targets: str = "logits"           # "logits" (teacher) | "onehot" (labels)
    epochs: int | None = None         # 30 for digits, 15 otherwise
    optimizer: str = "sgd"
    lr: float | None = None
    train_batch_size: int = 128
    batch_size: int = 32              # feature extraction
    feature_chunk: int = 1024         # samples per atomically saved feature chunk (resume granularity)
    m_grid: list[int] | None = None
    distill: str = "none"             # none | random | kcenter | wmdd (stage 1)
    ipc: int = 10                     # images per class for --distill
    distilled: str | None = None      # a distilled-set folder made by `dntk distill`
    wmdd_iterations: int = 200
    wmdd_classes_per_step: int = 1    # classes optimised in one batch (use C on a GPU)
    base_model: str = "teacher"       # teacher | student (trained on the distilled set, soft labels)
    student_epochs: int = 60
    gradient_distill: str = "none"    # none | local-global | random | fps | kmeans | leverage
    budget: int | None = None         # s gradients per class kernel (budget mode)
    tau_v: float = 0.95
    tau_g: float = 0.9
    clusters: int = 10
    gd_mode: str = "per_class"        # per_class | class_average
    progress: bool = True
    cache_data: bool = True

    def resolved(self) -> "RunConfig":
        c = RunConfig(**asdict(self))
        c.check_numbers()
        digits = c.dataset == "digits"
        if c.model is None:
            c.model = default_model(c.dataset)
        if c.image_size is None:
            c.image_size = default_image_size(c.dataset)
        if c.epochs is None:
            c.epochs = 30 if digits else 15
        if c.m is None:
            c.m = 500
        if c.projector not in NAMES:
            raise DNTKError(f"unknown projector {c.projector!r}; valid names: {', '.join(NAMES)}")
        from .gradient_stage import GRADIENT_METHODS

        if c.gradient_distill not in ("none",) + GRADIENT_METHODS:
            raise DNTKError(f"unknown gradient distillation {c.gradient_distill!r}; valid names: none, "
                            f"{', '.join(GRADIENT_METHODS)}")
        if c.budget is not None and c.budget > c.m:
            raise DNTKError(f"--budget {c.budget} is larger than --m {c.m}; choose s ≤ m")
        for name in ("tau_v", "tau_g"):
            if not 0 < getattr(c, name) <= 1:
                raise DNTKError(f"--{name.replace('_', '-')} {getattr(c, name)} must lie in (0, 1]")
        if c.distill not in ("none", "random", "kcenter", "wmdd"):
            raise DNTKError(f"unknown distillation {c.distill!r}; valid names: none, random, kcenter, wmdd")
        if c.base_model not in ("teacher", "student"):
            raise DNTKError(f"unknown base model {c.base_model!r}; use 'teacher' or 'student'")
        if c.base_model == "student" and c.distill == "none" and not c.distilled:
            raise DNTKError("--base-model student trains on a distilled set: add --distill {random,kcenter,wmdd}")
        if c.targets not in ("logits", "onehot"):
            raise DNTKError(f"unknown targets {c.targets!r}; use 'logits' or 'onehot'")
        return c

    def check_numbers(self) -> None:
        """Refuse numeric settings outside their range (None keeps meaning "the default"); never
        replace a nonsense value such as k=0 by a default."""
        for name, (minimum, default) in _INT_RANGES.items():
            value = getattr(self, name)
            if value is None and default is not None:
                continue
            if not is_int_at_least(value, minimum):
                unset = f", or leave it unset for the default ({default})" if default is not None else ""
                raise DNTKError(f"--{name.replace('_', '-')} {value!r} is out of range: it must be an integer ≥ "
                                f"{minimum}{unset}")
        for name, (low, inclusive, default) in _FLOAT_RANGES.items():
            value = getattr(self, name)
            if value is None and default is not None:
                continue
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
                (value >= low if inclusive else value > low)
            if not ok:
                unset = f", or leave it unset for the default ({default})" if default is not None else ""
                raise DNTKError(f"--{name.replace('_', '-')} {value!r} is out of range: it must be a number "
                                f"{'≥' if inclusive else '>'} {low:g}{unset}")
        if self.m_grid is not None:
            bad = [v for v in self.m_grid if not is_int_at_least(v, 1)]
            if bad or not self.m_grid:
                raise DNTKError(f"--m-grid {self.m_grid!r} must be a non-empty list of integers ≥ 1 (training-set "
                                f"sizes), or unset for the default log grid")


# the kernel model's summary in results.json: mse is against the regression targets used (--targets),
# mse_vs_teacher_logits against the teacher's logits (the two agree with --targets logits)
KM_KEYS = ("fidelity", "accuracy", "mse", "mse_vs_teacher_logits", "condition_number", "min_eigenvalue")

# name -> (smallest valid value, what None means; None when None is not allowed)
_INT_RANGES = {
    "k": (1, "min(4096, P/2)"),
    "m": (1, "500"),
    "n_test": (1, "the whole test split"),
    "image_size": (1, "64; digits 8"),
    "epochs": (1, "30 for digits, 15 otherwise"),
    "train_batch_size": (1, None),
    "batch_size": (1, None),
    "feature_chunk": (1, None),
    "ipc": (1, None),
    "wmdd_iterations": (0, None),
    "wmdd_classes_per_step": (1, None),
    "student_epochs": (1, None),
    "budget": (1, "none: Algorithm 1 picks s from the thresholds"),
    "clusters": (1, None),
}
# name -> (bound, bound allowed, what None means; None when None is not allowed)
_FLOAT_RANGES = {
    "lr": (0.0, False, "0.05 for sgd, 2e-3 for adamw"),
    "ridge": (0.0, True, None),
}


class _Stages:
    """Wall-clock seconds per named stage (a stage entered twice accumulates)."""

    def __init__(self):
        self.timings: dict[str, float] = {}

    @contextmanager
    def time(self, name: str):
        t = time.perf_counter()
        try:
            yield
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t


def _digest(*parts) -> str:
    h = hashlib.sha1()
    for p in parts:
        if isinstance(p, torch.Tensor):
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
        else:
            h.update(json.dumps(p, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def model_checksum(model: torch.nn.Module) -> str:
    return _digest(*[t for _, t in sorted(model.state_dict().items())])


def _atomic_json(obj, path: Path):
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=float))
    tmp.replace(path)


def _cached(path: Path, compute):
    if path.exists():
        return torch.load(path, weights_only=False)
    value = compute()
    tmp = path.with_suffix(".tmp")
    torch.save(value, tmp)
    tmp.replace(path)
    return value


def default_m_grid(m: int, C: int) -> list[int]:
    grid = sorted({v for v in (C, 2 * C, 3 * C, 5 * C, 7 * C, 10 * C, 15 * C, 20 * C, 30 * C, 40 * C, 50 * C,
                               75 * C, 100 * C) if v < m} | {m})
    return grid


def krr_metrics(F_train, y_train, F_test, logits_test, labels_test, ridge, m_values, *, kernels=None,
                targets_test=None):
    """Metrics of the per-class KRR for each training prefix size in m_values.

    F_train [C, m, k] (or, with kernels=(K_train [C, m, m], K_test [C, n, m]), precomputed).
    targets_test [n, C]: the test inputs' regression targets of the kind y_train holds (one-hot
    labels with ``--targets onehot``); ``mse`` is measured against them, ``mse_vs_teacher_logits``
    against logits_test. None means y_train are logits."""
    rows = []
    for mm in m_values:
        model = PerClassKRR(ridge=ridge, normalize="trace")
        if kernels is None:
            model.fit(F_train[:, :mm], y_train[:mm])
            pred = model.predict(F_test)
            Kt = torch.einsum("cik,cjk->cij", F_train[:, :mm].double(), F_train[:, :mm].double())
        else:
            K_train, K_test = kernels
            model.fit_kernel(K_train[:, :mm, :mm], y_train[:mm])
            pred = model.predict_kernel(K_test[:, :, :mm])
            Kt = K_train[:, :mm, :mm]
        cond = metrics.kernel_conditioning(Kt)
        row = {"m": mm, **metrics.summarize(pred, logits_test, labels_test, targets_test),
               "condition_number": cond["condition_number"], "min_eigenvalue": cond["min_eigenvalue"]}
        rows.append(row)
    return rows


def run(config: RunConfig) -> dict:
    """Run the main job; returns the results dict also written to ``out/results.json``."""
    cfg = config.resolved()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    st = _Stages()
    log = print  # progress=False silences the bars, not the results

    # -- data ----------------------------------------------------------------------------------------
    with st.time("data"):
        kw = {"cache_dir": out / "cache", "progress": cfg.progress} if cfg.dataset != "digits" and cfg.cache_data else {}
        if cfg.dataset != "digits":
            kw["download"] = cfg.download
        train_set, test_set = load_splits(cfg.dataset, root=cfg.data_root, image_size=cfg.image_size, **kw)
        C = train_set.num_classes
        if cfg.n_test is not None:
            test_set = test_set.subset(balanced_indices(test_set.labels, min(cfg.n_test, len(test_set)), C))
    if cfg.m > len(train_set):  # checked before any training so the mistake costs nothing
        raise DNTKError(f"--m {cfg.m} is larger than the training set ({len(train_set)} images); choose m ≤ {len(train_set)}")
    log(f"data: {cfg.dataset}, {len(train_set)} train / {len(test_set)} test images of shape "
        f"{train_set.image_shape}, {C} classes")

    # -- teacher -------------------------------------------------------------------------------------
    with st.time("teacher"):
        teacher = build_model(cfg.model, C, in_channels=train_set.image_shape[0], image_size=cfg.image_size, stem=cfg.stem)
        if cfg.checkpoint:
            load_checkpoint(teacher, cfg.checkpoint)
            trained = None
        else:
            tcfg = teacher_train_config(cfg.dataset, epochs=cfg.epochs, optimizer=cfg.optimizer, lr=cfg.lr, seed=cfg.seed,
                                        batch_size=cfg.train_batch_size)
            trained = train(teacher, train_set, test_set, tcfg, out / "teacher", device=cfg.device,
                            progress=cfg.progress)
        teacher.to(cfg.device).eval()
        test_acc, _ = evaluate(teacher, test_set, device=cfg.device)
    teacher_checksum = model_checksum(teacher)
    P = sum(p.numel() for p in teacher.parameters() if p.requires_grad)
    log(f"teacher: {cfg.model}, P={P:,}, test accuracy {test_acc:.4f}")

    # -- features ------------------------------------------------------------------------------------
    distilled = None
    if cfg.distill != "none" or cfg.distilled:
        from ..distill import distill as run_distill
        from ..distill import load_distilled

        with st.time("distillation"):
            if cfg.distilled:
                distilled = load_distilled(cfg.distilled)
            else:
                dkw = ({"iterations": cfg.wmdd_iterations, "classes_per_step": cfg.wmdd_classes_per_step}
                       if cfg.distill == "wmdd" else {})
                distilled = run_distill(cfg.distill, teacher, train_set, cfg.ipc,
                                        out / f"distill-{cfg.distill}-ipc{cfg.ipc}-seed{cfg.seed}", seed=cfg.seed,
                                        device=cfg.device, progress=cfg.progress, teacher_checksum=teacher_checksum, **dkw)
            distilled.check_compatible(train_set)
        order = balanced_indices(distilled.labels, len(distilled), C)
        X_train, y_train_labels = distilled.tensors(order)
        cfg.m = len(distilled)
        log(f"distilled set: {distilled.method}, m={cfg.m} ({len(train_set) / cfg.m:.1f}× fewer Jacobians than "
            f"{len(train_set)} real images)")
    else:
        X_train, y_train_labels = train_set.tensors(balanced_indices(train_set.labels, cfg.m, C, seed=cfg.seed))
    X_test, y_test = test_set.tensors()

    base, base_name, student_acc, base_checksum = teacher, "teacher", None, teacher_checksum
    if cfg.base_model == "student":
        with st.time("student"):
            base, student_acc = _train_student(cfg, teacher, X_train, y_train_labels, test_set, out, teacher_checksum)
        base_name = "student"
        base_checksum = model_checksum(base)
        log(f"student trained on the {cfg.m} distilled images: test accuracy {student_acc:.4f}")
    k = cfg.k if cfg.k is not None else min(4096, P // 2)
    projector = make_projector(cfg.projector, k=k, seed=cfg.seed)
    fkey = _digest(base_checksum, cfg.projector, k, cfg.seed, _digest(X_train), len(test_set), _digest(test_set.labels))

    def features(X, tag, model=None, key=fkey):
        return chunked_features(out / f"features-{tag}-{key}", model or base, X, projector, cfg)

    with st.time("features_train"):
        ftr = features(X_train, "train")
    with st.time("features_test"):
        fte = features(X_test, "test")
    F_train, F_test = ftr["features"], fte["features"]
    logits_train, logits_test = ftr["logits"], fte["logits"]
    y_train = logits_train.double() if cfg.targets == "logits" else one_hot(y_train_labels, C)
    y_test_targets = logits_test.double() if cfg.targets == "logits" else one_hot(y_test, C)  # mse is against these

    # -- kernel model ------------------------------------------------------------------------------------
    with st.time("kernel_model"):
        grid = cfg.m_grid if cfg.m_grid is not None else default_m_grid(cfg.m, C)
        grid = sorted({g for g in grid if 0 < g <= cfg.m} | {cfg.m})
        curve = krr_metrics(F_train, y_train, F_test, logits_test, y_test, cfg.ridge, grid,
                            targets_test=y_test_targets)
    final = curve[-1]
    results = {
        "config": asdict(cfg),
        "teacher": {"model": cfg.model, "parameters": P, "test_accuracy": test_acc, "checksum": teacher_checksum,
                    "source": cfg.checkpoint or str(out / "teacher" / "best.pt"),
                    "best_epoch": trained.best_epoch if trained else None},
        "projector": {"name": projector.name, "k": projector.dim, "seed": cfg.seed},
        "gradient_paths": ftr.get("path_shares"),  # share of parameters per engine path (dntk.features.capture)
        "targets": cfg.targets,
        "kernel_model": {key: final[key] for key in KM_KEYS},
        "base_model": {"name": base_name, "test_accuracy": student_acc if student_acc is not None else test_acc,
                       "checksum": base_checksum},
        "distillation": None if distilled is None else {
            "method": distilled.method, "ipc": cfg.ipc, "m": cfg.m, "jacobians_saved": len(train_set) / cfg.m,
            "seconds": st.timings.get("distillation", 0.0), "source": cfg.distilled},
        "counts": {"n_real": len(train_set), "m": cfg.m, "n_real_over_m": len(train_set) / cfg.m,
                   "n_test": len(test_set), "classes": C,
                   "per_sample_gradients": (cfg.m + len(test_set)) * C, "parameters": P, "k": projector.dim},
        "curves": {"projected": curve},
    }

    if base_name == "student":  # the paper's Figure 1 compares the two base models on the same points
        with st.time("teacher_comparison"):
            tkey = _digest(teacher_checksum, cfg.projector, k, cfg.seed, _digest(X_train), len(test_set))
            t_tr = features(X_train, "train-teacher", teacher, tkey)
            t_te = features(X_test, "test-teacher", teacher, tkey)
            t_y = t_tr["logits"].double() if cfg.targets == "logits" else one_hot(y_train_labels, C)
            t_yt = t_te["logits"].double() if cfg.targets == "logits" else one_hot(y_test, C)
            results["curves"]["teacher"] = krr_metrics(t_tr["features"], t_y, t_te["features"], t_te["logits"], y_test,
                                                       cfg.ridge, grid, targets_test=t_yt)
        results["kernel_model_teacher"] = {key: results["curves"]["teacher"][-1][key]
                                           for key in KM_KEYS}

    # -- exact comparison -------------------------------------------------------------------------------
    if cfg.exact:
        with st.time("exact"):
            ex = _cached(out / f"exact-{fkey}.pt", lambda: {
                # gradients beyond the 2 GiB memory budget spill to a temporary folder in out (not /tmp,
                # which may be RAM-backed); each image's gradients are computed once
                "K_train": empirical_ntk(base, X_train.to(cfg.device), spill_dir=out),
                "K_test": empirical_ntk(base, X_test.to(cfg.device), X_train.to(cfg.device), spill_dir=out)})
            Kp = torch.einsum("cik,cjk->cij", F_train.double(), F_train.double())
            ex_curve = krr_metrics(None, y_train, None, logits_test, y_test, cfg.ridge, grid,
                                   kernels=(ex["K_train"], ex["K_test"]), targets_test=y_test_targets)
        results["exact"] = {
            "kernel_relative_error": metrics.kernel_relative_error(Kp, ex["K_train"]),
            "kernel_alignment": metrics.kernel_alignment(Kp, ex["K_train"]),
            "kernel_model": {key: ex_curve[-1][key] for key in KM_KEYS},
        }
        results["curves"]["exact"] = ex_curve

    if cfg.gradient_distill != "none":
        from .gradient_stage import run_gradient_stage

        with st.time("gradient_distillation"):
            gd = run_gradient_stage(F_train, y_train, y_train_labels, F_test, logits_test, y_test,
                                    targets_test=y_test_targets,
                                    method=cfg.gradient_distill, budget=cfg.budget, tau_v=cfg.tau_v, tau_g=cfg.tau_g,
                                    n_clusters=min(cfg.clusters, cfg.m), ridge=cfg.ridge, seed=cfg.seed, out=out,
                                    class_names=train_set.classes, mode=cfg.gd_mode)
        results["gradient_distillation"] = gd
        log(f"gradient distillation ({cfg.gradient_distill}): s={gd['s']} per class (m/s={gd['compression']:.1f}); "
            f"fidelity {gd['kernel_model']['fidelity']:.4f}, accuracy {gd['kernel_model'].get('accuracy', float('nan')):.4f}, "
            f"mse {gd['kernel_model']['mse']:.4g} (all m: fidelity {gd['kernel_model_all_m']['fidelity']:.4f}); "
            f"truncation ranks {gd['ranks']['per-logit kernel, all m points']}")

    with st.time("figure"):
        label = f"{base_name} · {projector.name} k={projector.dim}" + (f" · {distilled.method}" if distilled else "")
        curves = {label: results["curves"]["projected"]}
        if "teacher" in results["curves"]:
            curves[f"teacher · {projector.name} k={projector.dim}" + (f" · {distilled.method}" if distilled else "")] = \
                results["curves"]["teacher"]
        if cfg.exact:
            curves["exact eNTK"] = results["curves"]["exact"]
        figure1(curves, out / "figure1.png", teacher_accuracy=student_acc if student_acc is not None else test_acc,
                title=f"{cfg.dataset} · {cfg.model} · per-class KRR (ridge {cfg.ridge:g}, trace-normalised)")
    results["timings_s"] = dict(st.timings)
    results["peak_memory_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    _atomic_json(results, out / "results.json")
    log(format_results(results))
    log(f"wrote {out / 'results.json'} and {out / 'figure1.png'}")
    return results


def _train_student(cfg, teacher, X_train, y_train_labels, test_set, out, checksum):
    """A student of the teacher's architecture trained on the distilled images only, with the
    teacher's soft labels on every augmented batch (WMDD's FKD-style relabelling)."""
    from ..distill.store import DistilledSet

    ds = DistilledSet(X_train, y_train_labels, list(test_set.classes), test_set.mean, test_set.std, test_set.name,
                      cfg.distill)
    student = build_model(cfg.model, test_set.num_classes, in_channels=test_set.image_shape[0],
                          image_size=cfg.image_size, stem=cfg.stem)
    torch.manual_seed(cfg.seed)
    tcfg = TrainConfig(epochs=cfg.student_epochs, optimizer="adamw", batch_size=min(64, len(ds)), seed=cfg.seed,
                       weight_decay=0.01, augment="shift" if cfg.dataset == "digits" else "crop_flip")
    train(student, ds, test_set, tcfg, out / f"student-{_digest(checksum, _digest(X_train))}", teacher=teacher.eval(),
          device=cfg.device, progress=cfg.progress)
    student.eval()
    return student, evaluate(student, test_set, device=cfg.device)[0]


def chunked_features(folder: Path, model, X: torch.Tensor, projector, cfg: RunConfig) -> dict:
    """gradient_features of X in chunks of cfg.feature_chunk samples, each saved atomically in
    ``folder``; an interrupted extraction resumes at the first missing chunk.
    Returns {"features": [C, n, k], "logits": [n, C], "classes": [...]}."""
    folder.mkdir(parents=True, exist_ok=True)
    step = max(1, cfg.feature_chunk)
    parts = []
    for start in range(0, X.shape[0], step):
        parts.append(_cached(folder / f"chunk-{start:09d}.pt", lambda: _feature_dict(gradient_features(
            model, X[start:start + step], projector, batch_size=cfg.batch_size, device=cfg.device,
            progress=cfg.progress))))
    return {"features": torch.cat([p["features"] for p in parts], 1), "logits": torch.cat([p["logits"] for p in parts]),
            "classes": parts[0]["classes"], "path_shares": parts[0].get("path_shares")}


def _feature_dict(r):
    return {"features": r.features, "logits": r.logits, "classes": r.classes, "path_shares": r.path_shares()}


def format_results(res: dict) -> str:
    km = res["kernel_model"]
    lines = ["", f"{'':28s}{'projected':>14s}" + (f"{'exact eNTK':>14s}" if "exact" in res else "")]
    targets = res.get("targets", "logits")
    for key in KM_KEYS:
        if key == "mse_vs_teacher_logits" and targets == "logits":
            continue  # identical to mse
        name = {"mse": f"mse (vs {targets} targets)", "mse_vs_teacher_logits": "mse vs teacher logits"}.get(key, key)
        row = f"{name:28s}{km[key]:>14.4g}"
        if "exact" in res:
            row += f"{res['exact']['kernel_model'][key]:>14.4g}"
        lines.append(row)
    if "exact" in res:
        lines.append(f"{'kernel rel. error vs exact':28s}{res['exact']['kernel_relative_error']:>14.4g}")
        lines.append(f"{'kernel alignment vs exact':28s}{res['exact']['kernel_alignment']:>14.4g}")
    c = res["counts"]
    lines.append(f"teacher test accuracy {res['teacher']['test_accuracy']:.4f}; m={c['m']} of {c['n_real']} real, "
                 f"{c['n_test']} test, {c['per_sample_gradients']:,} per-sample gradients, P={c['parameters']:,} → k={c['k']}")
    lines.append("timings (s): " + ", ".join(f"{k}={v:.1f}" for k, v in res["timings_s"].items())
                 + f"; peak memory {res['peak_memory_mb']:.0f} MB")
    return "\n".join(lines)
