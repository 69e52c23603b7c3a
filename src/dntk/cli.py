"""Command line: a thin skin over the Python API.

    dntk run     [options]   teacher → projected NTK features → per-class KRR → results.json + figure1.png
    dntk train   [options]   train (or resume) a teacher only
    dntk ntk     [options]   exact per-class eNTK of a few inputs (saved as a tensor)
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import fields
from pathlib import Path

from .errors import DNTKError


def _int_at_least(minimum: int):
    """argparse type: an integer ≥ minimum. A flag left out keeps its default (None or a number);
    an explicit out-of-range value such as ``--k 0`` is an error naming the flag, never the default."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer ≥ {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer ≥ {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _number(low: float, inclusive: bool):
    """argparse type: a finite float > low (or ≥ low when inclusive)."""

    def parse(text: str) -> float:
        sign = "≥" if inclusive else ">"
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number {sign} {low:g}, got {text!r}") from None
        if not math.isfinite(value) or not (value >= low if inclusive else value > low):
            raise argparse.ArgumentTypeError(f"must be a finite number {sign} {low:g}, got {text}")
        return value

    parse.__name__ = f"number {'>=' if inclusive else '>'} {low:g}"
    return parse


POSITIVE = _int_at_least(1)
NON_NEGATIVE = _int_at_least(0)
POSITIVE_FLOAT = _number(0.0, inclusive=False)
NON_NEGATIVE_FLOAT = _number(0.0, inclusive=True)


def _add_common(p: argparse.ArgumentParser):
    from .data import DATASETS
    from .models import MODELS

    p.add_argument("--dataset", default="digits", help=f"one of {', '.join(DATASETS)} (default: digits, embedded)")
    p.add_argument("--data-root", default=None, help="ImageFolder root with train/ and val/ (folder, imagenette)")
    p.add_argument("--download", action="store_true", help="imagenette: download with torchvision if --data-root lacks it")
    p.add_argument("--model", default=None, help=f"one of {', '.join(MODELS)} (default: small_cnn for digits, else resnet18)")
    p.add_argument("--image-size", type=POSITIVE, default=None, help="side length after resize + centre crop (default 64; digits 8)")
    p.add_argument("--stem", choices=["auto", "small", "imagenet"], default="auto",
                   help="ResNet-18 stem: small (3x3/1) for inputs <= 64 px under auto")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="dntk-out", help="output folder; rerunning resumes from what is there")
    p.add_argument("--epochs", type=POSITIVE, default=None, help="teacher epochs (default 30 for digits, 15 otherwise)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--lr", type=POSITIVE_FLOAT, default=None,
                   help="learning rate > 0 (default 0.05 for sgd, 2e-3 for adamw)")
    p.add_argument("--train-batch-size", type=POSITIVE, default=128)
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    from .projection import DEFAULT, NAMES

    parser = argparse.ArgumentParser(prog="dntk", description="Distilled neural tangent kernels of trained classifiers.")
    sub = parser.add_subparsers(dest="verb")

    run = sub.add_parser("run", help="the main job (no arguments: embedded digits default, ~1 minute on 2 cores)")
    _add_common(run)
    run.add_argument("--checkpoint", default=None, help="teacher weights (torchvision / DataParallel / WMDD key layouts); "
                                                        "default: train one, cached in OUT/teacher")
    run.add_argument("--projector", default=DEFAULT, help=f"one of {', '.join(NAMES)} (default {DEFAULT})")
    run.add_argument("--k", type=POSITIVE, default=None, help="projection dimension (default min(4096, P/2))")
    run.add_argument("--m", type=POSITIVE, default=None, help="training points for the kernel model, even across classes (default 500)")
    run.add_argument("--n-test", type=POSITIVE, default=None, help="test points (default: the whole test split)")
    run.add_argument("--ridge", type=NON_NEGATIVE_FLOAT, default=1e-4, help="ridge, relative to the mean kernel diagonal")
    run.add_argument("--targets", choices=["logits", "onehot"], default="logits", help="regress teacher logits or labels")
    run.add_argument("--exact", action="store_true", help="also compute the exact per-class eNTK and compare")
    run.add_argument("--m-grid", default=None, help="comma-separated m values for figure1 (default: a log grid up to m)")
    run.add_argument("--batch-size", type=POSITIVE, default=32, help="samples per feature pass")
    run.add_argument("--distill", default="none", help="stage 1: none, random, kcenter, wmdd (default none)")
    run.add_argument("--ipc", type=POSITIVE, default=10, help="images per class for --distill")
    run.add_argument("--distilled", default=None, help="use a distilled-set folder made by `dntk distill`")
    run.add_argument("--wmdd-iterations", type=NON_NEGATIVE, default=200, help="WMDD steps per class (WMDD's own: 2000)")
    run.add_argument("--wmdd-classes-per-step", type=POSITIVE, default=1,
                     help="WMDD classes optimised in one batch (same objective; use C on a GPU)")
    run.add_argument("--base-model", choices=["teacher", "student"], default="teacher",
                     help="the network whose NTK is analysed: the teacher, or a student trained on the distilled set")
    run.add_argument("--student-epochs", type=POSITIVE, default=60)
    run.add_argument("--gradient-distill", default="none",
                     help="none, local-global (Algorithm 1), random, fps, kmeans, leverage (default none)")
    run.add_argument("--budget", type=POSITIVE, default=None, help="exactly s gradients per class kernel (m/s = compression)")
    run.add_argument("--tau-v", type=float, default=0.95, help="explained variance for truncation ranks (Algorithm 1)")
    run.add_argument("--tau-g", type=float, default=0.9, help="coverage below which a global direction is a gap")
    run.add_argument("--clusters", type=POSITIVE, default=10, help="clusters H per class kernel (Algorithm 1)")
    run.add_argument("--gd-mode", choices=["per_class", "class_average"], default="per_class")

    tr = sub.add_parser("train", help="train (or resume) a teacher and report its test accuracy")
    _add_common(tr)

    dis = sub.add_parser("distill", help="distil the training set (wmdd, random, kcenter) to IPC images per class")
    _add_common(dis)
    dis.add_argument("--method", default="wmdd", help="wmdd, random or kcenter")
    dis.add_argument("--ipc", type=POSITIVE, default=10)
    dis.add_argument("--checkpoint", default=None, help="teacher weights (default: train one in OUT/teacher)")
    dis.add_argument("--iterations", type=NON_NEGATIVE, default=200, help="WMDD optimisation steps per class (WMDD uses 2000)")
    dis.add_argument("--wmdd-lr", type=POSITIVE_FLOAT, default=0.05)
    dis.add_argument("--bn-weight", type=NON_NEGATIVE_FLOAT, default=1.0)
    dis.add_argument("--ce-weight", type=NON_NEGATIVE_FLOAT, default=1.0)
    dis.add_argument("--feature-weight", type=NON_NEGATIVE_FLOAT, default=1.0)
    dis.add_argument("--classes-per-step", type=POSITIVE, default=1,
                     help="WMDD classes optimised together in one batch (same objective; use C on a GPU)")

    ntk = sub.add_parser("ntk", help="exact empirical NTK of the first n test images")
    _add_common(ntk)
    ntk.add_argument("--checkpoint", required=True)
    ntk.add_argument("--n", type=POSITIVE, default=16)
    ntk.add_argument("--blocks", choices=["per_class", "full", "trace"], default="per_class")
    return parser


def _run(args):
    from .pipeline import RunConfig, run

    names = {f.name for f in fields(RunConfig)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values["progress"] = not args.quiet
    if args.m_grid:
        try:
            values["m_grid"] = [int(v) for v in args.m_grid.split(",")]
        except ValueError:
            raise DNTKError(f"--m-grid must be comma-separated integers ≥ 1, got {args.m_grid!r}") from None
    run(RunConfig(**values))


def _data(args, split=None):
    """(train, val, image_size) — or one split — of the dataset the flags name."""
    from .data import load_split, load_splits
    from .pipeline.run import default_image_size

    size = args.image_size if args.image_size is not None else default_image_size(args.dataset)
    kw = {} if args.dataset == "digits" else {"cache_dir": Path(args.out) / "cache", "progress": not args.quiet,
                                              "download": args.download}
    if split:
        return load_split(args.dataset, split, root=args.data_root, image_size=size, **kw), size
    return (*load_splits(args.dataset, root=args.data_root, image_size=size, **kw), size)


def _model(args, data, size):
    from .models import build_model
    from .pipeline.run import default_model

    return build_model(args.model or default_model(args.dataset), data.num_classes, data.image_shape[0], size, args.stem)


def _teacher_for(args, train_set, val_set, size):
    """The teacher: loaded from --checkpoint, or trained (and cached) in OUT/teacher."""
    from .models import load_checkpoint
    from .pipeline.run import teacher_train_config
    from .training import train

    model = _model(args, train_set, size)
    if getattr(args, "checkpoint", None):
        return load_checkpoint(model, args.checkpoint), None
    cfg = teacher_train_config(args.dataset, epochs=args.epochs, optimizer=args.optimizer, lr=args.lr, seed=args.seed,
                               batch_size=args.train_batch_size)
    res = train(model, train_set, val_set, cfg, Path(args.out) / "teacher", device=args.device, progress=not args.quiet)
    return model, res


def _train(args):
    train_set, val_set, size = _data(args)
    _, res = _teacher_for(args, train_set, val_set, size)
    print(json.dumps({"best_val_accuracy": res.best_accuracy, "best_epoch": res.best_epoch, "seconds": res.seconds,
                      "checkpoint": str(Path(args.out) / "teacher" / "best.pt")}, indent=1))


def _distill(args):
    from .distill import distill
    from .pipeline.run import model_checksum

    train_set, val_set, size = _data(args)
    teacher = _teacher_for(args, train_set, val_set, size)[0].eval()
    opts = {}
    if args.method == "wmdd":
        opts = {"iterations": args.iterations, "lr": args.wmdd_lr, "bn_weight": args.bn_weight,
                "ce_weight": args.ce_weight, "feature_weight": args.feature_weight,
                "classes_per_step": args.classes_per_step}
    out = Path(args.out) / f"distill-{args.method}-ipc{args.ipc}-seed{args.seed}"
    ds = distill(args.method, teacher, train_set, args.ipc, out, seed=args.seed, device=args.device,
                 progress=not args.quiet, teacher_checksum=model_checksum(teacher), **opts)
    print(f"distilled {len(ds)} images ({args.method}, {args.ipc} per class) to {out}")


def _ntk(args):
    import torch

    from .features import empirical_ntk
    from .models import load_checkpoint

    test, size = _data(args, "val")
    model = load_checkpoint(_model(args, test, size), args.checkpoint)
    x, _ = test.tensors(torch.arange(min(args.n, len(test))))
    K = empirical_ntk(model.to(args.device), x.to(args.device), blocks=args.blocks)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / f"ntk-{args.blocks}.pt"
    torch.save(K, path)
    print(f"saved {tuple(K.shape)} float64 kernel to {path}")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.verb is None:
        parser.print_help()
        return 2
    try:
        {"run": _run, "train": _train, "distill": _distill, "ntk": _ntk}[args.verb](args)
    except DNTKError as e:
        print(f"dntk: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
