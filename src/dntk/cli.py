"""Command line: a thin skin over the Python API. Every flag is generated from the settings
dataclasses of :mod:`dntk.config`, so a setting has the same name and default on every verb.

    dntk run     [options]   teacher → projected NTK features → per-class KRR → results.json + figures
    dntk train   [options]   train (or resume) a teacher only
    dntk distill [options]   distil the training set (--distill wmdd|random|kcenter|kernel-greedy|kernel-herding)
                             to --ipc images per class
    dntk ntk     [options]   exact per-class eNTK of a few test images (saved as a tensor)
    dntk store verify DIR    check a feature store's shards (presence, shapes, SHA-1)
    dntk reproduce [options] the paper's setting end to end (--setting paper160 | cpu64): both runs, theory
                             diagnostics, DNTK vs the exact eNTK, per-stage costs → OUT/report/report.md;
                             --probe N: measure the setting's unit costs on N images and extrapolate instead

Under ``torchrun --nproc-per-node N -m dntk run ...`` the feature extraction is split across the N
processes (see :mod:`dntk.distributed`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .config import RunConfig, add_options, int_at_least, options_from_args
from .errors import DNTKError

# the flags of each verb: (section, include, exclude) — None includes every field of the section
_RUN_ONLY_TEACHER = ("checkpoint", "base_model", "student_epochs", "student_protocol")   # teacher settings `dntk train` has no use for
DISTILL_ONLY = ("evaluate", "evaluate_epochs")   # `dntk distill --evaluate`: run evaluates with its own --base-model
VERBS = {
    "run": [("data", None, ()), ("teacher", None, ()), ("features", None, ()),
            ("distill", None, DISTILL_ONLY),
            ("kernel", None, ()), ("gradients", None, ()), (None, None, ())],
    "train": [("data", None, ("n_test",)), ("teacher", None, _RUN_ONLY_TEACHER), (None, None, ())],
    "distill": [("data", None, ("n_test",)), ("teacher", None, ("base_model", "student_epochs", "student_protocol")),
                ("features", ("projector", "k", "batch_size"), ()), ("distill", None, ("load",)),
                ("kernel", ("ridge", "targets"), ()), (None, None, ())],
    "ntk": [("data", None, ("n_test",)), ("teacher", ("model", "stem", "checkpoint", "pretrained"), ()),
            (None, None, ())],
    "check-model": [("data", None, ("n_test",)), ("teacher", ("model", "stem", "checkpoint", "pretrained"), ()),
                    ("features", ("projector", "k"), ()), (None, None, ())],
}
HELP = {
    "run": "the main job (no arguments: embedded digits default, ~1 minute on 2 cores)",
    "train": "train (or resume) a teacher and report its test accuracy",
    "distill": "distil the training set (--distill wmdd, random, kcenter, kernel-greedy, kernel-herding) to --ipc "
               "images per class",
    "ntk": "exact empirical NTK of the first n test images",
    "check-model": "is dntk exact on this model? its features of n test images against brute-force autograd "
                   "(exit 3 on a mismatch or a refusal, 1 on an error)",
}


def _store(args):
    from .store import FeatureStore

    report = FeatureStore(args.folder).verify(checksums=not args.no_checksums)
    n_ok = report["shards"] - len(report["missing"]) - len(report["corrupt"])
    print(f"{args.folder}: {report['n']} samples in {report['shards']} shards, {n_ok} complete and intact")
    if report["missing"]:
        print(f"missing shards: {report['missing']} (rerun the extraction to compute them)")
    for i, name, why in report["corrupt"]:
        print(f"corrupt: shard {i} {name}: {why} (delete shard-{i:06d}.json and rerun to recompute it)")
    if not report["complete"]:
        raise DNTKError(f"{args.folder} is incomplete")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dntk", description="Distilled neural tangent kernels of trained classifiers.")
    sub = parser.add_subparsers(dest="verb")
    for verb, sections in VERBS.items():
        p = sub.add_parser(verb, help=HELP[verb], description=HELP[verb])
        for section, include, exclude in sections:
            add_options(p, section, include=include, exclude=exclude)
        if verb == "ntk":
            p.add_argument("--n", type=int_at_least(1), default=16, help="test images (default: 16)")
            p.add_argument("--blocks", choices=["per_class", "full", "trace"], default="per_class")
        if verb == "check-model":
            p.add_argument("--n", type=int_at_least(2), default=4,
                           help="test images checked in one batch, spread over the split (default: 4)")
    rp = sub.add_parser("reproduce", help="the paper's setting end to end, every stage's cost, one report",
                        description="the paper's setting end to end (see dntk.pipeline.reproduce): two runs (teacher "
                                    "and distilled-data student base models), Algorithm 1 at 20×/50×/100×, theory "
                                    "diagnostics, DNTK against the exact eNTK on a subset, per-stage costs; writes "
                                    "OUT/reproduce.json and OUT/report/report.md")
    from .pipeline.reproduce import SETTINGS

    rp.add_argument("--data-root", required=True, help="ImageFolder copy of ImageNette (train/ and val/)")
    rp.add_argument("--setting", choices=sorted(SETTINGS), default="cpu64",
                    help="paper160: the paper's (GPU-sized); cpu64: the same pipeline CPU-sized (default: cpu64)")
    rp.add_argument("--dataset", choices=("folder", "imagenette"), default="folder", help="(default: folder)")
    rp.add_argument("--out", default="dntk-reproduce", help="output folder; rerunning resumes (default: dntk-reproduce)")
    rp.add_argument("--device", default="cpu", help="cpu, cuda, ... (default: cpu)")
    rp.add_argument("--seed", type=int_at_least(0), default=0, help="(default: 0)")
    rp.add_argument("--quiet", action="store_false", dest="progress", help="no progress bars")
    rp.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                    help="override one of the setting's run options by its flag name, e.g. --set n_test=500 "
                         "--set wmdd_iterations=50 (repeatable)")
    for name, what in (("theory-images", "real training images estimating Σ_g"),
                       ("exact-train", "distilled images in the exact-eNTK subset"),
                       ("exact-test", "validation images in the exact-eNTK subset")):
        rp.add_argument(f"--{name}", type=int_at_least(1), default=None, help=f"{what} (default: the setting's)")
    rp.add_argument("--no-exact", action="store_false", dest="exact", help="skip the exact-eNTK comparison")
    rp.add_argument("--exact-memory-gb", type=float, default=6.0,
                    help="GiB of gradients the exact eNTK holds at once; more = fewer gradient passes (default: 6)")
    rp.add_argument("--report-dir", default=None, help="where report.md and its figures go (default: OUT/report)")
    rp.add_argument("--probe", type=int_at_least(1), default=None, metavar="N",
                    help="do not run: measure the setting's unit costs on N images and extrapolate every stage "
                         "(writes probe-<setting>.json and .md to --report-dir, default OUT)")
    store = sub.add_parser("store", help="inspect a feature store", description="inspect a feature store")
    actions = store.add_subparsers(dest="action", required=True)
    verify = actions.add_parser("verify", help="check that every shard is present and intact (SHA-1)")
    verify.add_argument("folder", help="a feature store folder (OUT/features-...)")
    verify.add_argument("--no-checksums", action="store_true", help="check presence and shapes only")
    return parser


def _config(args) -> RunConfig:
    return RunConfig.from_options(**options_from_args(args)).resolved()


def _run(args):
    from .pipeline import run

    run(_config(args))


def _teacher(cfg: RunConfig, train_set):
    from .training import load_or_train_teacher

    if getattr(train_set, "image_shape", None) is None and cfg.distill.method == "wmdd":
        raise DNTKError("WMDD synthesises pixels; this data is not images — use --distill random, kcenter, "
                        "kernel-greedy or kernel-herding")
    return load_or_train_teacher(cfg.teacher, cfg.data.dataset, cfg.data.image_size, train_set, cfg.out,
                                 seed=cfg.seed, device=cfg.device, progress=cfg.progress)


def _data(cfg: RunConfig, split=None):
    from .data import load_configured
    from .models import pad_token_id

    return load_configured(cfg.data, cache_dir=Path(cfg.out) / "cache", progress=cfg.progress, split=split,
                           pad_id=pad_token_id(spec=cfg.teacher.model))


def _train(args):
    cfg = _config(args)
    if cfg.teacher.train_teacher == "never":
        raise DNTKError("dntk train with --train-teacher never has nothing to do")
    if cfg.teacher.train_teacher == "auto":
        cfg.teacher.train_teacher = "always"   # the verb trains: an hf: folder is fine-tuned from its weights
    from .training import evaluate

    train_set, test_set = _data(cfg)
    teacher = _teacher(cfg, train_set)
    res = teacher.trained
    print(json.dumps({"test_accuracy": evaluate(teacher.model, test_set, device=cfg.device)[0],
                      "best_val_accuracy": res.best_accuracy, "best_epoch": res.best_epoch,
                      "validation": teacher.validation, "seconds": res.seconds, "checkpoint": teacher.source},
                     indent=1))


def _distill(args):
    from .distill import distill_dataset
    from .pipeline.stage1 import distilled_folder, kernel_options

    cfg = _config(args)
    d = cfg.distill
    if d.method == "none":
        raise DNTKError("dntk distill needs a method: --distill wmdd, random, kcenter, kernel-greedy or kernel-herding")
    train_set, val_set = _data(cfg)
    teacher = _teacher(cfg, train_set)
    out = distilled_folder(cfg.out, d.method, d.ipc, cfg.seed)
    ds = distill_dataset(d.method, teacher.model, train_set, d.ipc, out, seed=cfg.seed, device=cfg.device,
                         progress=cfg.progress, teacher_checksum=teacher.checksum,
                         kernel_options=kernel_options(d, cfg.features, teacher.model, cfg.seed, cfg.kernel),
                         **(d.wmdd_options() if d.method == "wmdd" else {}))
    print(f"distilled {len(ds)} images ({d.method}, {d.ipc} per class) to {out}")
    if d.evaluate:
        from .pipeline.stage1 import student_evaluation

        ev = student_evaluation(out, teacher.model, cfg, val_set)
        print(f"student under WMDD's protocol ({d.evaluate_epochs} epochs): test accuracy {ev['accuracy']:.4f} "
              f"(teacher {ev['teacher_accuracy']:.4f}); recorded in {out / 'manifest.json'}")


def _ntk(args):
    import torch

    from .features import empirical_ntk
    from .models import load_checkpoint
    from .training import build_network

    from .models import parse_model
    from .samples import to as to_device

    cfg = _config(args)
    if not cfg.teacher.checkpoint and not parse_model(cfg.teacher.model).carries_weights:
        raise DNTKError("dntk ntk analyses a trained network: pass --checkpoint (or --model hf:DIR, whose folder holds "
                        "its weights)")
    test = _data(cfg, "val")
    model = build_network(cfg.teacher, cfg.data.dataset, cfg.data.image_size, test)
    if cfg.teacher.checkpoint:
        load_checkpoint(model, cfg.teacher.checkpoint)
    x, _ = test.tensors(torch.arange(min(args.n, len(test))))
    K = empirical_ntk(model.to(cfg.device), to_device(x, cfg.device), blocks=args.blocks)
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    path = Path(cfg.out) / f"ntk-{args.blocks}.pt"
    torch.save(K, path)
    print(f"saved {tuple(K.shape)} float64 kernel to {path}")


def _check_model(args) -> int:
    import torch

    from .features import check_model
    from .models import load_checkpoint
    from .store import atomic_json
    from .training import build_network

    cfg = _config(args)
    test = _data(cfg, "val")
    model = build_network(cfg.teacher, cfg.data.dataset, cfg.data.image_size, test)
    if cfg.teacher.checkpoint:
        load_checkpoint(model, cfg.teacher.checkpoint)
    n = min(args.n, len(test))
    x, _ = test.tensors(torch.linspace(0, len(test) - 1, n).round().long())
    proj = cfg.features.projector
    res = check_model(model, x, sketch=None if proj == "identity" else proj, k=cfg.features.resolved_k(model), seed=cfg.seed,
                      device=cfg.device)
    print(res.summary())
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    atomic_json(res.to_dict(), Path(cfg.out) / "check-model.json")
    print(f"wrote {Path(cfg.out) / 'check-model.json'}")
    return 0 if res.exact else 3


def _overrides(pairs: list[str]) -> dict:
    """--set NAME=VALUE pairs → typed RunConfig options (checked by RunConfig.resolved)."""
    from dataclasses import fields as _fields

    from .config import SECTIONS, _option_index

    where = _option_index()
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise DNTKError(f"--set {pair!r}: write NAME=VALUE, e.g. --set n_test=500")
        name, text = pair.split("=", 1)
        name = name.strip().replace("-", "_")
        from .pipeline.reproduce import OWN_OPTIONS

        if name in OWN_OPTIONS:
            raise DNTKError(f"--set {pair!r}: {name} is a flag of dntk reproduce itself; pass "
                            f"--{name.replace('_', '-')} {text}")
        if name not in where:
            raise DNTKError(f"--set: unknown option {name!r}; valid names: "
                            f"{', '.join(sorted(set(where) - OWN_OPTIONS))}")
        section, fname = where[name]
        f = next(f for f in _fields(SECTIONS[section] if section else RunConfig) if f.name == fname)
        kind = f.metadata["kind"]
        try:
            if text.lower() == "none":
                value = None
            elif kind == "int":
                value = int(text)
            elif kind == "float":
                value = float(text)
            elif kind == "bool":
                value = {"true": True, "false": False}[text.lower()]
            elif kind == "ints":
                value = [int(v) for v in text.split(",")]
            else:
                value = text
        except (ValueError, KeyError):
            raise DNTKError(f"--set {pair!r}: {text!r} is not a valid {kind}") from None
        out[name] = value
    return out


def _positive_gib(gb: float) -> int:
    if not gb > 0 or gb != gb or gb == float("inf"):
        raise DNTKError(f"--exact-memory-gb {gb} must be a positive finite number of GiB")
    return int(gb * 2**30)


def _reproduce(args):
    from .pipeline.reproduce import ReproduceConfig, probe, reproduce

    rc = ReproduceConfig(data_root=args.data_root, setting=args.setting, dataset=args.dataset, out=args.out,
                         device=args.device, seed=args.seed, progress=args.progress, overrides=_overrides(args.set),
                         theory_images=args.theory_images, exact_train=args.exact_train, exact_test=args.exact_test,
                         exact=args.exact, report_dir=args.report_dir,
                         exact_memory_bytes=_positive_gib(args.exact_memory_gb))
    rc.run_config()  # every override checked before any work
    if args.probe is not None:
        from .report import write_probe_report
        from .store import atomic_json

        result = probe(rc, args.probe)
        where = Path(rc.report_dir or rc.out)
        where.mkdir(parents=True, exist_ok=True)
        atomic_json(result, where / f"probe-{rc.setting}.json")
        path = write_probe_report(result, where / f"probe-{rc.setting}.md")
        print(path.read_text())
        return
    reproduce(rc)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    try:
        verb = {"run": _run, "train": _train, "distill": _distill, "ntk": _ntk, "store": _store,
                "reproduce": _reproduce, "check-model": _check_model}[args.verb]
        if args.verb in ("train", "distill", "ntk", "check-model"):   # run and reproduce hold the lock themselves
            import os

            from .lock import hold

            cfg = _config(args)   # nonsense is refused before OUT (and its lock file) is made
            if args.verb == "distill" and cfg.distill.method == "none":
                raise DNTKError("dntk distill needs a method: --distill wmdd, random, kcenter, kernel-greedy or "
                                "kernel-herding")
            with hold(args.out, rank=int(os.environ.get("RANK", "0"))):
                code = verb(args)   # check-model: 3 when the model is not exact or refused (the report is printed)
                if code:
                    return code
        else:
            verb(args)
    except DNTKError as e:
        print(f"dntk: error: {e}", file=sys.stderr)
        return 1
    finally:
        _leave_process_group()
    return 0


def _leave_process_group():
    """Under torchrun: leave the process group the run joined (a no-op in one process)."""
    import torch

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
