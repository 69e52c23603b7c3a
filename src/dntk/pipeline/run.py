"""``dntk run``: data → teacher → stage 1 (training points) → base model → projected per-logit
features → per-class KRR (Figure 1) → [exact eNTK] → [stage 3] → results.json.

This module only orchestrates: every number is computed by the stage's own package and every
figure drawn by :mod:`dntk.report`. Each stage's output is kept in the output folder (teacher
checkpoints, distilled sets, feature chunks keyed by the model, projector, seed and the images),
written atomically
through :mod:`dntk.store`, so an interrupted or repeated run resumes instead of recomputing.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import metrics, report
from ..config import RunConfig
from ..errors import DNTKError
from ..features import empirical_ntk
from ..distributed import from_environment
from ..kernels import (class_weights, curve_from_predictions, default_m_grid, gather_predictions, krr_curve, one_hot,
                       predict_shards)
from ..projection import make as make_projector
from ..resources import StageTimer, process_peak_rss_mb
from ..samples import describe
from ..samples import to as to_device
from ..store import FeatureStore, cached, digest, model_checksum
from ..training import evaluate, load_or_train_teacher, training_seconds
from .prepare import FEATURE_FORMAT, announce, check_budget, check_data, check_k, check_out, feature_folder, feature_key, load_data
from .result import RunResult
from .stage1 import TrainingPoints, train_student_base, training_points
from .stage3 import figure3_budgets, gradient_stage

def run(config: RunConfig | None = None, *, model: torch.nn.Module | None = None, train_set=None, test_set=None,
        student=None) -> RunResult:
    """Run the main job with the output folder's lock held (:mod:`dntk.lock`: a second job on the same
    ``out`` is refused at once); see :func:`_run` for the arguments."""
    import os

    from ..lock import hold

    from ..resources import set_threads

    checked = (config if config is not None else RunConfig()).resolved(   # nonsense is refused before OUT is made
        model_name=None if model is None else f"object:{type(model).__name__}")
    check_out(checked.out)
    threads = torch.get_num_threads()
    try:
        set_threads(checked.threads)
        with hold(checked.out, rank=int(os.environ.get("RANK", "0"))):
            return _run(checked, model=model, train_set=train_set, test_set=test_set, student=student)
    finally:
        torch.set_num_threads(threads)   # --threads holds for the run, not for the caller's process after it


def _run(cfg: RunConfig, *, model: torch.nn.Module | None = None, train_set=None, test_set=None,
         student=None) -> RunResult:
    """Run the main job on a resolved config; returns the RunResult also written to ``out/results.json``.

    model: a trained classifier object — the teacher, used as it is (not retrained unless
        ``train_teacher="always"``); its logits are ``model(x)``, ``model(*x)`` or ``model(**x)`` (or
        their ``.logits``) for the samples' form (:mod:`dntk.samples`).
    train_set, test_set: the data instead of ``config.data`` — ImageSets, SampleSets, or any map-style
        torch Dataset yielding ``(x, y)`` (x a tensor, a tuple or a dict of tensors, integer token ids
        included) or dicts with a ``label``; materialised in memory (:func:`dntk.data.as_sample_set`).
        Both or neither.
    student: with ``base_model="student"`` and a model object, a callable ``student(num_classes=C)``
        building the fresh student network (a ``--model`` spec builds it from the same factory).
    """
    from ..resources import environment
    from ..training.teacher import data_fingerprint

    ranks = from_environment(cfg.device)  # one process, or this process's rank under torchrun
    cfg.device = ranks.device(cfg.device)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    st = StageTimer()
    log = print if ranks.main else (lambda *a, **k: None)  # progress=False silences the bars, not the results
    progress = cfg.progress and ranks.main
    if cfg.teacher.base_model == "student" and model is not None and student is None:
        raise DNTKError("--base-model student with a model object needs student=: a callable building a fresh network "
                        "(student(num_classes=C) -> nn.Module), since dntk cannot rebuild an object it did not make")

    given_data = train_set is not None
    with st.time("data"), ranks.main_first():
        train_set, test_set = load_data(cfg, train_set, test_set, model, out, progress)
    if given_data:   # recorded as what it is: data objects, at their own image size (or none)
        cfg.data.dataset, cfg.data.data_root = "python", None
        cfg.data.image_size = train_set.image_shape[-1] if getattr(train_set, "image_shape", None) else None
    C = train_set.num_classes
    check_data(train_set, test_set)
    # checked before any training so a mistake costs nothing
    if cfg.distill.method == "none" and not cfg.distill.load and cfg.kernel.m > len(train_set):
        raise DNTKError(f"--m {cfg.kernel.m} is larger than the training set ({len(train_set)} images); "
                        f"choose m ≤ {len(train_set)}")
    if cfg.distill.method != "none" and not cfg.distill.load:
        from ..distill import check_ipc

        check_ipc(train_set, cfg.distill.ipc)   # every method starts from ipc real images per class
        check_budget(cfg, cfg.distill.ipc * C, f"--ipc {cfg.distill.ipc} × {C} classes")
    log(f"data: {getattr(train_set, 'name', cfg.data.dataset)}, {len(train_set)} train / {len(test_set)} test "
        f"samples, inputs {describe(train_set.tensors(torch.arange(1))[0]).replace('[1,', '[n,')}, {C} classes")

    with st.time("teacher"):
        with ranks.main_first():
            teacher = load_or_train_teacher(cfg.teacher, cfg.data.dataset, cfg.data.image_size, train_set,
                                            out, seed=cfg.seed, device=cfg.device, progress=progress, model=model,
                                            check=lambda net: check_k(cfg, net))
        test_acc, _ = evaluate(teacher.model, test_set, device=cfg.device)
    P = check_k(cfg, teacher.model)
    log(f"teacher: {cfg.teacher.model}, P={P:,}, test accuracy {test_acc:.4f}"
        + ("" if teacher.trained else f" (weights: {teacher.source}, not trained here)"))

    with st.time("distillation"), ranks.main_first():
        points = training_points(cfg.distill, cfg.kernel.m, train_set, teacher=teacher.model,
                                 teacher_checksum=teacher.checksum, seed=cfg.seed, out_dir=out, device=cfg.device,
                                 progress=progress, features_cfg=cfg.features,
                                 kernel_cfg=cfg.kernel)
    if points.distilled is not None:
        cfg.kernel.m = len(points)
        log(f"distilled set: {points.distilled.method}, m={cfg.kernel.m} ({len(train_set) / cfg.kernel.m:.1f}× fewer "
            f"Jacobians than {len(train_set)} real images)")
    else:
        st.timings.pop("distillation")
    m = cfg.kernel.m
    check_budget(cfg, m, "the distilled set's size")

    base, base_acc, student_dir = teacher.model, test_acc, None
    if cfg.teacher.base_model == "student":
        with st.time("student"), ranks.main_first():
            base, base_acc, student_dir = train_student_base(cfg, teacher, points, train_set, test_set, out, progress, student)
        log(f"student trained on the {m} distilled images: test accuracy {base_acc:.4f}")
    base_checksum = teacher.checksum if base is teacher.model else model_checksum(base)

    k = cfg.features.resolved_k(teacher.model)
    projector = make_projector(cfg.features.projector, k=k, seed=cfg.seed)
    X_test, y_test = test_set.tensors()

    targets_of = _targets_maker(cfg.kernel.targets, C)
    grid = cfg.kernel.m_grid if cfg.kernel.m_grid is not None else default_m_grid(m, C)
    grid = sorted({g for g in grid if 0 < g <= m} | {m})

    def kernel_model(model, checksum, tag):
        """Features of the m points (and, stored, of the test split) of one base model, and its Figure 1
        curve. Folders are keyed by the model's checksum (not by its role), so a teacher-base run and a
        student-base run in one OUT share the teacher's features. Every rank extracts its shards; rank 0 alone fits (returns None elsewhere)."""
        key = feature_key(checksum, cfg.features.projector, k, cfg.seed)
        shard = cfg.features.feature_chunk
        extract = dict(identity={"model": checksum}, batch_size=cfg.features.batch_size, device=cfg.device,
                       progress=progress, rank=ranks.rank, world=ranks.world)
        stream = cfg.features.test_features == "stream"
        train = FeatureStore(feature_folder(out, "train", key, points.images), shard)
        if ranks.main:
            announce(log, model, points.images, X_test, train, projector, C, cfg, stream, P)
        with st.time(f"features_train{tag}"):  # each stage's time includes waiting for the other ranks
            train.extract(model, points.images, projector, **extract)
            if stream:
                ranks.barrier()
        if not stream:
            with st.time(f"features_test{tag}"):
                test = FeatureStore(feature_folder(out, "test", key, X_test), shard)
                test.extract(model, X_test, projector, **extract)
                ranks.barrier()
        y_train = targets_of(train.read_logits(), points.labels)
        if stream:  # test features are computed batch by batch and dropped; only predictions are kept
            with st.time(f"kernel_model{tag}"):
                with ranks.main_first():
                    weights, cond = cached(out / f"weights-{key}-{digest(points.images, grid, cfg.kernel)}.pt",
                                           lambda: class_weights(train, y_train, grid, ridge=cfg.kernel.ridge,
                                                                 device=cfg.device))
                folder = out / f"predictions-{key}-{digest(*[weights[g] for g in grid])}-{digest(X_test)}"
                predict_shards(model, X_test, projector, weights, folder, shard=shard, **{
                    k_: v for k_, v in extract.items() if k_ != "identity"})
                ranks.barrier()
                if not ranks.main:
                    return None
                pred = gather_predictions(folder, len(test_set), shard)
                curve = curve_from_predictions(pred["predictions"], cond, pred["logits"], y_test,
                                               targets_of(pred["logits"], y_test))
            return {"curve": curve, "train": train, "test_logits": pred["logits"], "paths": train.path_shares()}
        if not ranks.main:
            return None
        with st.time(f"kernel_model{tag}"):
            ftr, fte = train.read(projector=projector), test.read(projector=projector)
            curve = krr_curve(y_train, fte.logits, y_test, ridge=cfg.kernel.ridge, m_values=grid, train=ftr, test=fte,
                              targets_test=targets_of(fte.logits, y_test), device=cfg.device)
        return {"curve": curve, "train": train, "test_store": test, "ftr": ftr, "fte": fte, "test_logits": fte.logits,
                "y_train": y_train, "paths": ftr.path_shares()}

    base_km = kernel_model(base, base_checksum, "")
    teacher_km = kernel_model(teacher.model, teacher.checksum, "_teacher") if cfg.teacher.base_model == "student" \
        else None
    if not ranks.main:
        return None  # rank 0 finishes the job
    curves = {"projected": base_km["curve"]}
    result = RunResult(
        config=cfg.to_dict(),
        teacher={"model": cfg.teacher.model, "parameters": P, "test_accuracy": test_acc, "checksum": teacher.checksum,
                 "source": teacher.source, "best_epoch": teacher.trained.best_epoch if teacher.trained else None,
                 "validation": teacher.validation,
                 "train_seconds": training_seconds(Path(teacher.source).parent) if teacher.trained else None},
        base_model={"name": cfg.teacher.base_model, "test_accuracy": base_acc, "checksum": base_checksum,
                    "train_seconds": training_seconds(student_dir) if student_dir is not None else None},
        projector={"name": projector.name, "k": projector.dim, "seed": cfg.seed},
        gradient_paths=base_km["paths"], targets=cfg.kernel.targets,
        kernel_model=_at_m(curves["projected"]),
        counts={"n_real": len(train_set), "m": m, "n_real_over_m": len(train_set) / m, "n_test": len(test_set),
                "classes": C, "per_sample_gradients": (m + len(test_set)) * C, "parameters": P, "k": projector.dim},
        curves=curves)
    if points.distilled is not None:
        cost = (points.manifest or {}).get("jacobians", {})   # what stage 1 itself differentiated (a pool)
        stage1_images = cost.get("pool_images", 0)
        result.distillation = {"method": points.distilled.method, "ipc": cfg.distill.ipc, "m": m,
                               "jacobians_saved": len(train_set) / m, "stage1_jacobian_images": stage1_images,
                               "stage1_per_logit_gradients": stage1_images * C,
                               "jacobians_saved_with_stage1": len(train_set) / (m + stage1_images),
                               "seconds": st.timings.get("distillation", 0.0), "source": cfg.distill.load}

    if teacher_km is not None:  # the paper's Figure 1 compares the two base models on the same points
        curves["teacher"] = teacher_km["curve"]
        result.kernel_model_teacher = _at_m(curves["teacher"])

    if cfg.features.exact:
        with st.time("exact"):
            # gradients beyond the 2 GiB memory budget spill to a temporary folder in out (not /tmp,
            # which may be RAM-backed); each image's gradients are computed once
            X_train, X_dev = to_device(points.images, cfg.device), to_device(X_test, cfg.device)
            ex = cached(out / f"exact-{digest(FEATURE_FORMAT, base_checksum, digest(points.images), digest(X_test))}.pt",
                        lambda: {"K_train": empirical_ntk(base, X_train, spill_dir=out),
                                 "K_test": empirical_ntk(base, X_dev, X_train, spill_dir=out)})
            y_train = targets_of(base_km["train"].read_logits(), points.labels)
            curves["exact"] = krr_curve(y_train, base_km["test_logits"], y_test, ridge=cfg.kernel.ridge, m_values=grid,
                                        kernels=(ex["K_train"], ex["K_test"]),
                                        targets_test=targets_of(base_km["test_logits"], y_test), device=cfg.device)
            K_projected = base_km["train"].read(projector=projector).kernel()
        result.exact = {"kernel_relative_error": metrics.kernel_relative_error(K_projected, ex["K_train"]),
                        "kernel_alignment": metrics.kernel_alignment(K_projected, ex["K_train"]),
                        "kernel_model": _at_m(curves["exact"])}

    if cfg.gradients.method != "none":
        with st.time("gradient_distillation"):
            fte = base_km["fte"]
            stage = gradient_stage(base_km["ftr"], base_km["y_train"], points.labels, fte, fte.logits, y_test,
                                   cfg=cfg.gradients, ridge=cfg.kernel.ridge, seed=cfg.seed,
                                   class_names=train_set.classes, targets_test=targets_of(fte.logits, y_test),
                                   fig3_budgets=figure3_budgets(m))
        with st.time("figures_stage3"):
            report.gradient_stage_figures(stage, out, class_names=train_set.classes, tau_v=cfg.gradients.tau_v,
                                          tau_g=cfg.gradients.tau_g)
        result.gradient_distillation = stage.summary
        log(report.gradient_stage_line(stage.summary))

    with st.time("figure"):
        report.figure1(_figure1_curves(curves, cfg, projector, points), out / "figure1.png", teacher_accuracy=base_acc,
                       title=f"{cfg.data.dataset} · {cfg.teacher.model} · per-class KRR (ridge {cfg.kernel.ridge:g}, "
                             f"trace-normalised)")
    stores = {"train": base_km["train"], "test": base_km.get("test_store")}
    made_with = {name: st_.computed_with() for name, st_ in stores.items() if st_ is not None}
    mixed = sorted({key for w in made_with.values() for key in ("threads", "device") if len(w[key]) > 1})
    if mixed:
        log(f"warning: the stored features were computed under several {' and '.join(mixed)} settings "
            f"({made_with}; an extraction resumed under other settings): equal to float rounding, not bit-identical "
            "to one run — delete the feature folders and rerun for features of one setting")
    result.environment = {**environment(cfg.device), "world_size": ranks.world,
                          "data": {"train": data_fingerprint(train_set), "test": data_fingerprint(test_set)},
                          "features_computed_with": made_with}
    result.timings_s = dict(st.timings)
    result.peak_memory_mb = process_peak_rss_mb()
    result.stage_memory_mb = {"rss": dict(st.peak_rss_mb), "gpu": dict(st.peak_gpu_mb)}
    result.save(out / "results.json")
    log(report.format_results(result))
    log(f"wrote {out / 'results.json'} and {out / 'figure1.png'}")
    return result


def _at_m(curve: list[dict]) -> dict:
    """The kernel-model summary at the largest m (the last row of a curve)."""
    return {key: curve[-1][key] for key in report.KM_KEYS}


def _targets_maker(targets: str, C: int):
    def targets_of(logits, labels):
        """The regression targets [n, C]: the model's logits or one-hot labels (--targets)."""
        return logits.double() if targets == "logits" else one_hot(labels, C)
    return targets_of


def _figure1_curves(curves: dict, cfg: RunConfig, projector, points: TrainingPoints) -> dict:
    """Figure 1's legend labels for the computed curves."""
    stage1 = f" · {points.distilled.method}" if points.distilled is not None else ""
    labelled = {f"{cfg.teacher.base_model} · {projector.name} k={projector.dim}{stage1}": curves["projected"]}
    if "teacher" in curves:
        labelled[f"teacher · {projector.name} k={projector.dim}{stage1}"] = curves["teacher"]
    if "exact" in curves:
        labelled["exact eNTK"] = curves["exact"]
    return labelled
