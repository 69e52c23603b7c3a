"""WMDD at its own iteration count (2,000) on a GPU machine that cannot see the data, in three steps.

    python benchmarks/wmdd_device.py pack   [--ipcs 10 50] [--seeds 0 1 2] [--iterations 2000]   # here
    python benchmarks/wmdd_device.py run    --out DIR                                              # on the GPU
    python benchmarks/wmdd_device.py unpack --results DIR                                          # here

``pack`` computes everything WMDD takes from the real data — per class the barycenter support points
(``class_targets``), the BN statistics and the initial real images — with the library's own
functions, and writes it with the teacher's weights to .device/ (about 60 MB: the GPU machine is
sent the working tree, not ../shared/data). ``run`` optimises all classes of each (IPC, seed) in one
batch with ``optimise_group`` (WMDDConfig.classes_per_step = C, the same per-class objective) and
saves the images (float16 for the transfer: error below 1/16 of one 8-bit pixel step). ``unpack``
writes them as per-class resume blobs of the library's format into
runs/imagenette64/distill-wmdd-it<iterations>-ipc<ipc>-seed<seed>/, so ``wmdd()`` — and with it
bench_distill.py --iterations <iterations> — assembles the distilled set without recomputing it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from dntk.distill.wmdd import (
    WMDDConfig,
    bn_layers,
    class_targets,
    optimise_group,
    write_class_blob,
)
from dntk.models import build_model

PACK = HERE.parent / ".device"
ARCH = {"name": "resnet18", "num_classes": 10, "in_channels": 3, "image_size": 64, "stem": "imagenet"}


def pack(args):
    sys.path.insert(0, str(HERE))
    from bench_gradients import teacher_and_data
    from torchvision.io import encode_png

    from dntk.store import model_checksum

    teacher, tr, _ = teacher_and_data()
    C = tr.num_classes
    layers = bn_layers(teacher)
    runs, stats, needed = {}, None, set()
    for seed in args.seeds:
        for ipc in args.ipcs:
            cfg = WMDDConfig(ipc=ipc, iterations=args.iterations, seed=seed)
            sup, init = [], []
            per_class_stats = []
            for c in range(C):
                idx = torch.nonzero(tr.labels == c).flatten()
                t = class_targets(teacher, tr.tensors(idx)[0], c, cfg, layers)
                sup.append(t["support"])
                init.append(idx[t["init_indices"]])
                per_class_stats.append(t["stats"])
                needed.update(idx[t["init_indices"]].tolist())
            stats = stats or per_class_stats    # the class statistics do not depend on IPC or seed
            runs[f"{ipc}-{seed}"] = {"ipc": ipc, "seed": seed, "support": torch.stack(sup),
                                     "init_global": torch.cat(init)}
            print(f"packed ipc {ipc} seed {seed}", flush=True)
    order = sorted(needed)
    pngs = [bytes(encode_png(tr.images[i]).numpy()) for i in order]
    PACK.mkdir(exist_ok=True)
    torch.save({"arch": ARCH, "state": teacher.state_dict(), "checksum": model_checksum(teacher)}, PACK / "teacher.pt")
    torch.save({"runs": runs, "stats": stats, "index": order, "png": pngs, "mean": tr.mean, "std": tr.std,
                "classes": tr.classes, "iterations": args.iterations}, PACK / "targets.pt")
    size = sum(p.stat().st_size for p in PACK.iterdir()) / 2 ** 20
    print(f"wrote {PACK} ({size:.1f} MiB, {len(order)} initial images)")


def run(args):
    from torchvision.io import decode_png

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
    t = torch.load(PACK / "teacher.pt", weights_only=False)
    a = t["arch"]
    teacher = build_model(a["name"], a["num_classes"], a["in_channels"], a["image_size"], stem=a["stem"])
    teacher.load_state_dict(t["state"])
    teacher.to(device).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    pk = torch.load(PACK / "targets.pt", weights_only=False)
    u8 = torch.stack([decode_png(torch.frombuffer(bytearray(b), dtype=torch.uint8)) for b in pk["png"]])
    pos = {g: i for i, g in enumerate(pk["index"])}
    mean = torch.tensor(pk["mean"]).view(1, -1, 1, 1)
    std = torch.tensor(pk["std"]).view(1, -1, 1, 1)
    layers = bn_layers(teacher)
    C = len(pk["classes"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
               "tag": args.tag, "runs": {}}
    for ipc in args.ipcs:
        bundle = {}
        for seed in args.seeds:
            r = pk["runs"][f"{ipc}-{seed}"]
            cfg = WMDDConfig(ipc=ipc, iterations=args.iterations or pk["iterations"], seed=seed, classes_per_step=C,
                             lr=args.lr, bn_weight=args.bn_weight)
            init = (u8[[pos[g] for g in r["init_global"].tolist()]].float() / 255 - mean) / std
            if device == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            x, recs = optimise_group(teacher, init, list(range(C)), r["support"], pk["stats"], cfg, layers,
                                     device=device)
            if device == "cuda":
                torch.cuda.synchronize()
            sec = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated() / 2 ** 20 if device == "cuda" else None
            blob = {"images": x.half(), "records": recs, "seconds": sec, "peak_gpu_mb": peak, "settings": asdict(cfg)}
            # ≤ 16 MiB a file comes back: IPC 10 seeds share one file, IPC 50 gets one per seed
            if ipc * C * x[0].numel() * 2 * len(args.seeds) < 15 * 2 ** 20:
                bundle[seed] = blob
                torch.save(bundle, out / f"wmdd-{args.tag}-ipc{ipc}.pt")
            else:
                torch.save({seed: blob}, out / f"wmdd-{args.tag}-ipc{ipc}-seed{seed}.pt")
            summary["runs"][f"{ipc}-{seed}"] = {
                "seconds": sec, "peak_gpu_mb": peak, "iterations": cfg.iterations, "lr": cfg.lr,
                "bn_weight": cfg.bn_weight, "initial": recs[0]["initial_loss"], "final": recs[0]["final_loss"]}
            print(json.dumps({f"{args.tag} {ipc}-{seed}": {"seconds": round(sec, 1), "peak_gpu_mb": peak}}), flush=True)
            (out / f"summary-{args.tag}.json").write_text(json.dumps(summary, indent=1))


def unpack(args):
    sys.path.insert(0, str(HERE))
    from bench_gradients import ROOT, teacher_and_data

    from dntk.distill import wmdd
    from dntk.distill.wmdd import data_key
    from dntk.store import model_checksum

    teacher, tr, _ = teacher_and_data()
    ck = model_checksum(teacher)
    pk = torch.load(PACK / "targets.pt", weights_only=False)
    if torch.load(PACK / "teacher.pt")["checksum"] != ck:
        raise SystemExit("the packed teacher is not the cached teacher: pack again")
    res = Path(args.results)
    C = tr.num_classes
    members = [[int(i) for i in torch.nonzero(tr.labels == c).flatten().tolist()] for c in range(C)]
    for f in sorted(res.glob("wmdd-*.pt")):
        tag = f.name.split("-")[1]
        device = json.loads((res / f"summary-{tag}.json").read_text())["device"]
        for seed, blob in torch.load(f, weights_only=False).items():
            cfg = WMDDConfig(**blob["settings"])
            r = pk["runs"][f"{cfg.ipc}-{seed}"]
            out = ROOT / f"distill-wmdd-{tag}-ipc{cfg.ipc}-seed{seed}"
            for c in range(C):
                rows = r["init_global"][c * cfg.ipc:(c + 1) * cfg.ipc].tolist()
                rec = {**blob["records"][c], "init_indices": [members[c].index(g) for g in rows],
                       "seconds": blob["seconds"] / C, "device": device, "peak_gpu_mb": blob["peak_gpu_mb"]}
                write_class_blob(out, c, blob["images"][c * cfg.ipc:(c + 1) * cfg.ipc].float(), rec, cfg, ck,
                                 data_key(tr))
            ds = wmdd(teacher, tr, cfg, out, progress=False, teacher_checksum=ck)   # assembles, computes nothing
            print(f"{out.name}: {len(ds)} images, {blob['seconds']:.0f} s on {device}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("step", choices=["pack", "run", "unpack"])
    ap.add_argument("--ipcs", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--iterations", type=int, default=None, help="pack: default 2000; run: override the pack's")
    ap.add_argument("--out", default="wmdd-out")
    ap.add_argument("--tag", default="official", help="run: names the variant (folder distill-wmdd-<tag>-…)")
    ap.add_argument("--lr", type=float, default=0.25, help="run: WMDD's recover lr (default 0.25, its own)")
    ap.add_argument("--bn-weight", type=float, default=3.0, help="run: r_bn (default 3.0, WMDD's ImageNette run)")
    ap.add_argument("--results", default=".device/results")
    args = ap.parse_args()
    if args.step == "pack":
        args.iterations = args.iterations or 2000
        pack(args)
    elif args.step == "run":
        run(args)
    else:
        unpack(args)


if __name__ == "__main__":
    main()
