"""Command line: a thin skin over the Python API.

    dntk run     [options]   teacher → projected NTK features → per-class KRR → results.json + figure1.png
    dntk train   [options]   train (or resume) a teacher only
    dntk ntk     [options]   exact per-class eNTK of a few inputs (saved as a tensor)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path

from .errors import DNTKError


def _add_common(p: argparse.ArgumentParser):
    from .data import DATASETS
    from .models import MODELS

    p.add_argument("--dataset", default="digits", help=f"one of {', '.join(DATASETS)} (default: digits, embedded)")
    p.add_argument("--data-root", default=None, help="ImageFolder root with train/ and val/ (folder, imagenette)")
    p.add_argument("--model", default=None, help=f"one of {', '.join(MODELS)} (default: small_cnn for digits, else resnet18)")
    p.add_argument("--image-size", type=int, default=None, help="side length after resize + centre crop (default 64; digits 8)")
    p.add_argument("--stem", choices=["auto", "small", "imagenet"], default="auto",
                   help="ResNet-18 stem: small (3x3/1) for inputs <= 64 px under auto")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="dntk-out", help="output folder; rerunning resumes from what is there")
    p.add_argument("--epochs", type=int, default=None, help="teacher epochs (default 30 for digits, 15 otherwise)")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--train-batch-size", type=int, default=128)
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
    run.add_argument("--k", type=int, default=None, help="projection dimension (default min(4096, P/2))")
    run.add_argument("--m", type=int, default=None, help="training points for the kernel model, even across classes (default 500)")
    run.add_argument("--n-test", type=int, default=None, help="test points (default: the whole test split)")
    run.add_argument("--ridge", type=float, default=1e-4, help="ridge, relative to the mean kernel diagonal")
    run.add_argument("--targets", choices=["logits", "onehot"], default="logits", help="regress teacher logits or labels")
    run.add_argument("--exact", action="store_true", help="also compute the exact per-class eNTK and compare")
    run.add_argument("--m-grid", default=None, help="comma-separated m values for figure1 (default: a log grid up to m)")
    run.add_argument("--batch-size", type=int, default=32, help="samples per feature pass")

    tr = sub.add_parser("train", help="train (or resume) a teacher and report its test accuracy")
    _add_common(tr)

    ntk = sub.add_parser("ntk", help="exact empirical NTK of the first n test images")
    _add_common(ntk)
    ntk.add_argument("--checkpoint", required=True)
    ntk.add_argument("--n", type=int, default=16)
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
            raise DNTKError(f"--m-grid must be comma-separated integers, got {args.m_grid!r}") from None
    run(RunConfig(**values))


def _train(args):
    from .data import load_splits
    from .models import build_model
    from .training import TrainConfig, train

    size = args.image_size or (8 if args.dataset == "digits" else 64)
    train_set, val_set = load_splits(args.dataset, root=args.data_root, image_size=size,
                                     **({} if args.dataset == "digits" else {"cache_dir": Path(args.out) / "cache"}))
    model = build_model(args.model or ("small_cnn" if args.dataset == "digits" else "resnet18"), train_set.num_classes,
                        train_set.image_shape[0], size, args.stem)
    cfg = TrainConfig(epochs=args.epochs or (30 if args.dataset == "digits" else 15), optimizer=args.optimizer, lr=args.lr,
                      seed=args.seed, batch_size=args.train_batch_size,
                      augment="shift" if args.dataset == "digits" else "crop_flip")
    res = train(model, train_set, val_set, cfg, Path(args.out) / "teacher", device=args.device, progress=not args.quiet)
    print(json.dumps({"best_val_accuracy": res.best_accuracy, "best_epoch": res.best_epoch, "seconds": res.seconds,
                      "checkpoint": str(Path(args.out) / "teacher" / "best.pt")}, indent=1))


def _ntk(args):
    import torch

    from .data import load_split
    from .features import empirical_ntk
    from .models import build_model, load_checkpoint

    size = args.image_size or (8 if args.dataset == "digits" else 64)
    test = load_split(args.dataset, "val", root=args.data_root, image_size=size)
    model = build_model(args.model or ("small_cnn" if args.dataset == "digits" else "resnet18"), test.num_classes,
                        test.image_shape[0], size, args.stem)
    load_checkpoint(model, args.checkpoint)
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
        {"run": _run, "train": _train, "ntk": _ntk}[args.verb](args)
    except DNTKError as e:
        print(f"dntk: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
