"""The one command for a lent GPU (issue #21 item 3): CUDA tests, the zoo on the GPU and ``dntk reproduce
--setting paper160``, in one device call of under 9 minutes. Steps:

    python benchmarks/gpu_suite.py pack [--data-root DIR] [--val N]     # here: .device/gpu/ + the POT wheel in .whl/
    python benchmarks/gpu_suite.py run --out $OUT [--budget 540]        # on the GPU (carry .device/gpu and .whl)
    python benchmarks/gpu_suite.py unpack --results DIR                 # here: benchmarks/results/
    python benchmarks/gpu_suite.py --dry-run                            # here: the same plan and code, toy sizes, CPU
    python benchmarks/gpu_suite.py plan                                 # the plan alone (from the pack, or the defaults)

``pack`` decodes ImageNette with the library's own decoding at the paper160 input (``image_folder(root,
split, 160, resize=176)``: shorter side 176, centre crop 160), re-encodes every image as lossy WebP at the
highest quality whose total fits beside the tracked tree and the POT wheel under TARGET_MIB, and records in
``manifest.json`` the choice, the measured pixel error against the decoded uint8, the content digests and
the counts per class. POT's wheel is 31 MiB, 30.7 of them one compiled extension (``ot.bsp``) that dntk
never calls: ``pack`` writes a slim copy (``+nobsp``; the extension replaced by a stub that raises
ImportError when called) to .whl/ and keeps the full wheel out of it.

``run`` checks the device, unpacks the images into an ImageFolder under --work (writing the packed bytes
as .webp files, which the library reads, so reproduce decodes exactly the packed pixels; it is run with
``resize=none`` since the pack already holds Resize 176 → CenterCrop 160), verifies their digest, prints
and records **the plan** (a FLOP-based time estimate per stage, see the throughput constants below), then
runs, most important first, (a) ``pytest -m cuda``, (b) bench_zoo rows on the GPU against ``torch.func``
vmap(grad), (c) ``dntk reproduce --setting paper160`` with what is left of the budget. A stage whose
estimate exceeds the time left is skipped with the reason recorded; a failing stage is recorded and the
next one runs. ``$OUT/suite.json`` is rewritten atomically after every stage (a stage killed by the device
limit reads ``running``); ``$OUT/suite.log`` holds every command's output; ``$OUT/reproduce.tar.gz`` the
reproduce report (report.md, its JSON and figures). Three files: the device returns at most 8.

``--dry-run`` runs the same steps on the CPU at toy sizes: a seeded synthetic ImageFolder (10 classes ×
6 train / 3 val images of 16 px) packed by the same code, the CUDA tests collected (and skipped), one
zoo row, reproduce with toy overrides, and ``unpack`` into the work folder (never benchmarks/results).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SRC = ROOT / "src"
sys.path.insert(0, str(SRC))
sys.path.insert(0, str(HERE))

PACK = ROOT / ".device" / "gpu"
WHEELS = ROOT / ".whl"
WHEEL_CACHE = Path(os.environ.get("DNTK_WHEEL_CACHE", Path(tempfile.gettempdir()) / "dntk-wheels"))
RESULTS = HERE / "results"

# --- what travels: the device gets the working tree plus the carried paths, 64 MiB in all ----------------
CARRY_LIMIT_MIB = 64
TARGET_MIB = 60                      # what pack aims for (tree + .whl + .device/gpu), a margin under the limit
QUALITIES = (90, 85, 80, 78, 75, 72, 70, 65, 60, 50)   # WebP qualities tried, best first (lossless never fits)
WEBP_METHOD = 4                      # libwebp effort 0-6: 6 saves ~5% bytes at twice the encoding time
SLIM_TAG = "nobsp"                   # local version label of the slimmed POT wheel

# --- the plan's throughput assumptions (one H100 SXM; none of these is measured on an H100 yet) ----------
# training steps (teacher, student): 30% of the H100's 989 TFLOP/s dense bf16 — the GPU training pipeline's
# autocast; the classic float32 path would run near FP32_FLOPS_PER_S instead
TRAIN_FLOPS_PER_S = 0.30 * 989e12
# float32 work (WMDD's pixel steps, per-logit features, the exact eNTK's gradients): calibrated on the one
# GPU number this project has — WMDD IPC 50 × 2,000 iterations at 64 px took 35 s on an H200 (README), i.e.
# 2000 · 500 · 3 · 2.97e8 FLOP / 35 s ≈ 2.5e13 FLOP/s by model_flops' count (the H200 has the H100's compute)
FP32_FLOPS_PER_S = 2.5e13
# float64 linear algebra of reproduce's theory step (Gram matrices, eigvalsh, SVDs), which runs on the run's device:
# on the GPU, cuSOLVER's float64 eigh/SVD at this size (4,096) reach a few % of the H100's 67 TFLOP/s FP64 — 2e12
# assumed. (On 2 shared CPU cores the cpu64 run did ≈3.6e12 such FLOPs in ≈160 s, ≈2e10 FLOP/s.)
GPU_F64_FLOPS_PER_S = 2e12
PROCESS_OVERHEAD_S = 15.0            # a Python process: imports, CUDA context, cuDNN autotuning
CUDA_TEST_S = 10.0                   # per CUDA test: not FLOP-bound (small models, process and context start-up)
ZOO_ROW_OVERHEAD_S = 8.0             # per zoo model: build, first-batch calls, the recorder's per-call Python
REPRODUCE_CPU_S = 30.0               # reproduce's other CPU work: Algorithm 1, clustering, KRR curves, figures
RESERVE_S = 15.0                     # kept back at every stage start: the final write and the report bundle

GPU_ZOO_MODELS = ("resnet18", "vit_b_16", "convnext_tiny", "timm deit3_small")
# the dry run: toy sizes for every stage (reproduce's own flags and --set overrides)
DRY = {"classes": 10, "train": 6, "val": 3, "size": 16, "zoo_models": ("resnet18",), "zoo_n": 2, "zoo_batch": 2,
       "zoo_k": 64, "sets": ("model=small_cnn", "epochs=1", "wmdd_iterations=2", "student_epochs=1", "ipc=2", "k=64",
                "train_pipeline=device"),   # the pipeline CUDA takes under auto, exercised on the CPU
       "theory_images": 10, "exact_train": 10, "exact_test": 10, "exact_memory_gb": 0.05}


def log_to(path: Path | None):
    def log(*parts):
        text = " ".join(str(p) for p in parts)
        print(text, flush=True)
        if path is not None:
            with open(path, "a") as f:
                f.write(text + "\n")
    return log


def atomic_json(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


def mib(n: float) -> float:
    return n / 2 ** 20


# ========================================================================================================
# pack: the images and the POT wheel
# ========================================================================================================
def encode(x, quality: int) -> bytes:
    """uint8 [3, H, W] → lossy WebP bytes."""
    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(x.permute(1, 2, 0).contiguous().numpy()).save(b, "WEBP", quality=quality, method=WEBP_METHOD)
    return b.getvalue()


def decode(data: bytes):
    """WebP bytes → uint8 [3, H, W] (PIL, as the library's ImageFolder decoding opens them)."""
    import numpy as np
    import torch
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()


def pixel_sums(images, chunk: int = 256):
    """Per-image sums of uint8 pixels [n] (int64), a chunk at a time (an int64 copy of them all would be 8×)."""
    import torch

    return torch.cat([images[i:i + chunk].to(torch.int64).sum(dim=(1, 2, 3)) for i in range(0, len(images), chunk)]
                     or [torch.zeros(0, dtype=torch.int64)])


def content_digest(images, labels, classes) -> str:
    """The data's content key: pixels, labels, class names (dntk.distill.wmdd.data_key's recipe)."""
    from dntk.store import digest

    return digest(images, labels, list(classes))


def tree_bytes() -> int:
    """Bytes of what the device copies besides the carried paths: tracked files and untracked files git
    does not ignore."""
    try:
        r = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True,
                           check=True)
    except (OSError, subprocess.CalledProcessError):
        return int(3.5 * 2 ** 20)   # the tracked tree's size when this was written
    return sum((ROOT / f).stat().st_size for f in r.stdout.decode().split("\0") if f and (ROOT / f).is_file())


def folder_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.exists() else 0


def _record_line(name: str, data: bytes) -> str:
    h = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={h},{len(data)}"


STUB = '''"""Removed from this slim POT wheel by dntk's benchmarks/gpu_suite.py: ot.bsp's compiled extension
(174 MB uncompressed, 30.7 MB in the wheel), which dntk never calls. Install the full POT wheel to use ot.bsp."""


def _removed(*args, **kwargs):
    raise ImportError("ot.bsp's compiled extension (bsp_wrap) was removed from this slim POT wheel "
                      "(dntk benchmarks/gpu_suite.py); install the full POT wheel to use ot.bsp")


bsp_solve_c = merge_bijections_c = _removed
'''


def slim_wheel(full: Path, dest_dir: Path, tag: str = SLIM_TAG) -> Path:
    """A copy of POT's wheel without ot/bsp's compiled extension (a stub module in its place), its version
    given the local label ``+tag``, its dist-info folder renamed and RECORD rewritten with every file's
    SHA-256 and size (a valid wheel pip installs)."""
    m = re.match(r"(?P<name>[^-]+)-(?P<ver>[^-]+)-(?P<rest>.+)\.whl$", full.name)
    if not m:
        raise SystemExit(f"{full.name} is not a wheel file name")
    name, ver = m["name"], m["ver"]
    if "+" in ver:
        raise SystemExit(f"{full.name} already carries a local version label")
    new_ver = f"{ver}+{tag}"
    old_info, new_info = f"{name}-{ver}.dist-info/", f"{name}-{new_ver}.dist-info/"
    out = dest_dir / f"{name}-{new_ver}-{m['rest']}.whl"
    records = []
    dest_dir.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    with zipfile.ZipFile(full) as zin, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zout:
        removed = [n for n in zin.namelist() if re.fullmatch(r"ot/bsp/bsp_wrap\..*\.so", n)]
        if not removed:
            raise SystemExit(f"{full.name} has no ot/bsp/bsp_wrap extension to remove")
        for info in zin.infolist():
            n = info.filename
            if n in removed or n == old_info + "RECORD" or n.endswith("/"):
                continue
            data = zin.read(n)
            if n.startswith(old_info):
                n = new_info + n[len(old_info):]
                if n == new_info + "METADATA":
                    data = re.sub(rb"^Version: .*$", f"Version: {new_ver}".encode(), data, count=1, flags=re.M)
            zi = zipfile.ZipInfo(n, date_time=info.date_time)
            zi.external_attr = info.external_attr
            zi.compress_type = zipfile.ZIP_DEFLATED
            zout.writestr(zi, data)
            records.append(_record_line(n, data))
        stub = STUB.encode()
        zout.writestr("ot/bsp/bsp_wrap.py", stub)
        records.append(_record_line("ot/bsp/bsp_wrap.py", stub))
        records.append(f"{new_info}RECORD,,")
        zout.writestr(new_info + "RECORD", "\n".join(records) + "\n")
    os.replace(tmp, out)
    return out


def ensure_wheel(log=print) -> dict:
    """The slim POT wheel in .whl/ for the device's Python 3.12 (downloaded once into WHEEL_CACHE, never
    left in .whl/: the full wheel alone would use half the 64 MiB). Returns what .whl/ holds."""
    from importlib.metadata import version

    ver = version("POT")
    WHEELS.mkdir(exist_ok=True)
    for stray in WHEELS.glob("pot-*.whl"):      # a full POT wheel (e.g. downloaded by hand) goes to the cache
        if f"+{SLIM_TAG}-" not in stray.name:
            WHEEL_CACHE.mkdir(parents=True, exist_ok=True)
            size = stray.stat().st_size
            shutil.move(str(stray), WHEEL_CACHE / stray.name)
            log(f"moved {stray.name} ({mib(size):.1f} MiB, not slimmed) out of .whl/ to {WHEEL_CACHE}")
    slim = sorted(WHEELS.glob(f"pot-{ver}+{SLIM_TAG}-cp312-*.whl"))
    if not slim:
        full = sorted(WHEEL_CACHE.glob(f"pot-{ver}-cp312-*.whl"))
        if not full:
            log(f"downloading POT {ver} for CPython 3.12 (manylinux x86_64) into {WHEEL_CACHE}")
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                   "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64", "--platform",
                   "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64", "-d", str(WHEEL_CACHE),
                   f"pot=={ver}"]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode != 0:
                log(f"[warn] pip download failed ({r.returncode}): {r.stderr[-500:]}")
                return {"pot": ver, "wheel": None, "error": "pip download failed; WMDD (reproduce) cannot run"}
            full = sorted(WHEEL_CACHE.glob(f"pot-{ver}-cp312-*.whl"))
        slim = [slim_wheel(full[-1], WHEELS)]
        log(f"wrote {slim[0].name}: {mib(slim[0].stat().st_size):.2f} MiB (full wheel {mib(full[-1].stat().st_size):.1f} MiB)")
    others = [p.name for p in WHEELS.iterdir() if p.is_file() and p != slim[-1]]
    if others:
        log(f"[warn] .whl/ also holds {', '.join(others)}: they travel and are installed too")
    return {"pot": ver, "wheel": slim[-1].name, "wheel_bytes": slim[-1].stat().st_size, "others": others}


def toy_folder(root: Path, classes: int = DRY["classes"], train: int = DRY["train"], val: int = DRY["val"],
               size: int = DRY["size"], seed: int = 0) -> Path:
    """A seeded synthetic ImageFolder: per class a base colour and a smooth gradient, plus noise (PNG)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
    for c in range(classes):
        base = rng.uniform(40, 215, 3)
        slope = rng.uniform(-60, 60, (2, 3))
        for split, n in (("train", train), ("val", val)):
            d = root / split / f"class{c:02d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                a = base + xx[..., None] * slope[0] + yy[..., None] * slope[1] + rng.normal(0, 12, (size, size, 3))
                Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(d / f"{i:03d}.png")
    return root


def _git_commit() -> str | None:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return None


def pack(data_root, out: Path = PACK, *, val: int | None = None, image_size: int = 160, resize: int | None = 176,
         quality: int | None = None, wheel: bool = True, target_mib: float = TARGET_MIB, count_tree: bool = True,
         log=print) -> dict:
    """Decode, re-encode and write the pack (images.bin, index.json, manifest.json) to ``out``."""
    import torch

    from dntk.data import balanced_indices
    from dntk.data.sources import image_folder

    t0 = time.perf_counter()
    torch.set_num_threads(1)
    splits = {}
    for split in ("train", "val"):
        ds = image_folder(data_root, split, image_size, resize=resize, workers=0)
        idx = torch.arange(len(ds))
        if split == "val" and val is not None and val < len(ds):
            idx = balanced_indices(ds.labels, val, ds.num_classes).sort().values
        splits[split] = {"images": ds.images[idx], "labels": ds.labels[idx], "classes": list(ds.classes),
                         "of": len(ds)}
        log(f"decoded {data_root}/{split}: {len(idx)} of {len(ds)} images at {image_size} px (resize {resize})")
    classes = splits["train"]["classes"]
    if splits["val"]["classes"] != classes:
        raise SystemExit("train and val have different class folders")
    wheel_info = ensure_wheel(log) if wheel else {"wheel": None, "note": "not packed (--no-wheel)"}
    fixed = (tree_bytes() if count_tree else 0) + folder_bytes(WHEELS) * bool(wheel) + 512 * 1024  # + index/manifest
    room = target_mib * 2 ** 20 - fixed
    everything = torch.cat([splits["train"]["images"], splits["val"]["images"]])
    n = len(everything)
    sample = everything[torch.linspace(0, n - 1, min(256, n)).round().long()]
    tried = []
    candidates = [quality] if quality else list(QUALITIES)
    start = 0
    for i, q in enumerate(candidates):            # the highest quality whose estimate fits
        est = sum(len(encode(x, q)) for x in sample) / len(sample) * n * 1.02
        tried.append({"quality": q, "estimated_bytes": int(est)})
        start = i
        if est <= room:
            break
    for q in candidates[start:]:                 # encode; step down if the estimate was optimistic
        blobs = [encode(x, q) for x in everything]
        total = sum(map(len, blobs))
        if total <= room or q == candidates[-1]:
            break
        log(f"quality {q}: {mib(total):.1f} MiB > {mib(room):.1f} MiB of room; trying lower")
    if total > room:
        raise SystemExit(f"even WebP quality {q} needs {mib(total):.1f} MiB but {mib(room):.1f} MiB are left under "
                         f"{target_mib} MiB: pass --val N (fewer validation images) or a lower --quality")
    # what the device will decode, measured against the library's decoded uint8
    dec = torch.stack([decode(b) for b in blobs])
    n_tr = len(splits["train"]["images"])

    def stats(lo, hi, chunk=256):
        """|decoded − source| over images lo..hi, in chunks (a whole int64 difference would be 8 GB)."""
        s_abs = s_sq = 0
        top = 0
        for i in range(lo, hi, chunk):
            d = (dec[i:min(i + chunk, hi)].to(torch.int32) - everything[i:min(i + chunk, hi)].to(torch.int32)).abs()
            s_abs += int(d.sum(dtype=torch.int64))
            s_sq += int((d * d).sum(dtype=torch.int64))
            top = max(top, int(d.max()))
        count = (hi - lo) * everything[0].numel()
        mse = s_sq / count
        return {"mean_abs_error": s_abs / count, "max_abs_error": top,
                "psnr_db": 10 * math.log10(255 ** 2 / mse) if mse > 0 else float("inf")}

    out.mkdir(parents=True, exist_ok=True)
    index, manifest_splits, offset = {}, {}, 0
    for split, lo, hi in (("train", 0, n_tr), ("val", n_tr, n)):
        s = splits[split]
        lengths = [len(b) for b in blobs[lo:hi]]
        index[split] = {"labels": s["labels"].tolist(), "lengths": lengths,
                        "sums": pixel_sums(dec[lo:hi]).tolist()}
        manifest_splits[split] = {
            "images": hi - lo, "of": s["of"], "bytes": sum(lengths), "offset": offset,
            "per_class": torch.bincount(s["labels"], minlength=len(classes)).tolist(),
            "source_digest": content_digest(s["images"], s["labels"], classes),
            "packed_digest": content_digest(dec[lo:hi], s["labels"], classes),
            **stats(lo, hi)}
        offset += sum(lengths)
    tmp = out / ".images.bin.tmp"
    with open(tmp, "wb") as f:
        for b in blobs:
            f.write(b)
    os.replace(tmp, out / "images.bin")
    atomic_json(index, out / "index.json")
    manifest = {
        "what": "ImageNette (or --data-root) decoded by dntk.data.sources.image_folder(root, split, image_size, "
                "resize=resize), re-encoded as lossy WebP; images.bin is the files' bytes back to back in index.json's "
                "order (train then val, each in the library's sorted file order)",
        "data_root": str(data_root), "image_size": image_size, "resize": resize, "classes": classes,
        "format": "webp", "quality": q, "webp_method": WEBP_METHOD, "quality_estimates": tried,
        "subset": ("all train and val images" if manifest_splits["val"]["images"] == splits["val"]["of"] else
                   f"all {n_tr} train images and {manifest_splits['val']['images']} of {splits['val']['of']} val "
                   "images (balanced over classes, dntk.data.balanced_indices)"),
        "splits": manifest_splits, "images_bytes": total, "mean_bytes_per_image": total / n,
        "overall": stats(0, n), "wheel": wheel_info, "git_commit": _git_commit(),
        "packed_with": {"python": platform.python_version(), "torch": torch.__version__,
                        "pillow": __import__("PIL").__version__}, "seconds": None}
    manifest["seconds"] = time.perf_counter() - t0
    atomic_json(manifest, out / "manifest.json")
    tree = tree_bytes() if count_tree else 0
    carry = {"tree": tree, ".whl": folder_bytes(WHEELS) if wheel else 0, str(out.relative_to(ROOT)) if
             out.is_relative_to(ROOT) else str(out): folder_bytes(out)}
    manifest["carry_bytes"] = {**carry, "total": sum(carry.values())}
    atomic_json(manifest, out / "manifest.json")
    o = manifest["overall"]
    log(f"packed {n} images ({manifest['subset']}) as WebP q{q}: {mib(total):.1f} MiB, {total / n / 1024:.2f} KiB "
        f"per image; mean |error| {o['mean_abs_error']:.2f} of 255 (max {o['max_abs_error']}, PSNR {o['psnr_db']:.1f} "
        f"dB) in {manifest['seconds']:.0f} s")
    log(f"carried in all: {mib(manifest['carry_bytes']['total']):.1f} MiB of {CARRY_LIMIT_MIB} "
        f"({', '.join(f'{k} {mib(v):.1f}' for k, v in carry.items())})")
    if count_tree and manifest["carry_bytes"]["total"] > CARRY_LIMIT_MIB * 2 ** 20:
        raise SystemExit(f"the device takes {CARRY_LIMIT_MIB} MiB in all; this is {mib(manifest['carry_bytes']['total']):.1f}")
    other = [p.name for p in out.parent.iterdir() if p != out] if out.parent.name == ".device" else []
    if other:
        log(f"[note] {out.parent} also holds {', '.join(other)}: carry {out.relative_to(ROOT)} alone, not .device")
    return manifest


def unpack_images(pack_dir: Path, root: Path, log=print) -> dict:
    """Write the packed bytes as an ImageFolder (root/split/class/NNNNN.webp). A file already there with the
    right size is kept (so a rerun on a warm machine keeps reproduce's caches, which are keyed by mtimes)."""
    manifest = json.loads((pack_dir / "manifest.json").read_text())
    index = json.loads((pack_dir / "index.json").read_text())
    classes = manifest["classes"]
    written = kept = 0
    with open(pack_dir / "images.bin", "rb") as f:
        for split in ("train", "val"):
            f.seek(manifest["splits"][split]["offset"])
            counters = [0] * len(classes)
            for label, length in zip(index[split]["labels"], index[split]["lengths"]):
                data = f.read(length)
                d = root / split / classes[label]
                d.mkdir(parents=True, exist_ok=True)
                p = d / f"{counters[label]:05d}.webp"
                counters[label] += 1
                if p.exists() and p.stat().st_size == length:
                    kept += 1
                    continue
                p.write_bytes(data)
                written += 1
    log(f"unpacked {written + kept} images into {root} ({written} written, {kept} already there)")
    return {"root": str(root), "written": written, "kept": kept}


def verify_unpacked(pack_dir: Path, root: Path, cache_dir: Path | None, workers: int = 0) -> dict:
    """Decode the unpacked tree with the library (image_folder, no resize: the pack is already cropped) and
    compare with the pack's digests and per-image pixel sums. With ``cache_dir`` the decoded tensors are kept
    where reproduce looks for them (OUT/cache, keyed by the same paths), so reproduce does not decode twice."""
    import torch

    from dntk.data.sources import image_folder

    manifest = json.loads((pack_dir / "manifest.json").read_text())
    index = json.loads((pack_dir / "index.json").read_text())
    out = {}
    for split in ("train", "val"):
        ds = image_folder(str(root), split, manifest["image_size"], cache_dir=cache_dir, workers=workers)
        sums = pixel_sums(ds.images)
        want = torch.tensor(index[split]["sums"])
        bad = (sums != want).nonzero().flatten()
        dig = content_digest(ds.images, ds.labels, ds.classes)
        out[split] = {"images": len(ds), "digest": dig, "matches_pack": dig == manifest["splits"][split]["packed_digest"],
                      "images_whose_pixel_sum_differs": int(len(bad)),
                      "mean_abs_sum_difference_per_pixel": float((sums - want).abs().double().mean() / ds.images[0].numel())}
    return out


# ========================================================================================================
# the plan: FLOP-based time estimates
# ========================================================================================================
def _flops(model, size: int, channels: int = 3) -> dict:
    import torch

    from dntk.resources import model_flops

    return model_flops(model, torch.zeros(1, channels, size, size))


def count_cuda_tests(tests: Path = ROOT / "tests") -> int:
    """Test functions marked ``cuda``: every test of a module whose ``pytestmark`` names it, else each
    ``@pytest.mark.cuda`` decorator (a parametrised test counts once)."""
    n = 0
    for p in tests.glob("test_*.py"):
        text = p.read_text()
        if re.search(r"^pytestmark\s*=.*pytest\.mark\.cuda\b", text, flags=re.M):
            n += len(re.findall(r"^def test_", text, flags=re.M))
        else:
            n += len(re.findall(r"^@pytest\.mark\.cuda\b", text, flags=re.M))
    return n


def cuda_tests_plan() -> dict:
    """Not FLOP-bound: a fixed allowance per CUDA-marked test."""
    n = count_cuda_tests()
    return {"stage": "cuda_tests", "tests": n, "formula": "process start + tests × CUDA_TEST_S (not FLOP-bound)",
            "parts": [], "seconds": PROCESS_OVERHEAD_S + n * CUDA_TEST_S}


def zoo_flops(F: float, B: float, n: int, C: int = 10) -> float:
    """bench_zoo's FLOPs for one model: BN calibration (n forwards), warm-up (2 images × (F + C·B)), dntk
    (n × (F + C·B): one forward, C logit backwards), bare vmap(grad) (C × n × (F + B): a forward and
    backward per logit), the kernel error's exact eNTK (4 images × 2 logits × (F + B)) and features (4 × (F + 2B))."""
    return n * F + 2 * (F + C * B) + n * (F + C * B) + C * n * (F + B) + 4 * 2 * (F + B) + 4 * (F + 2 * B)


def zoo_plan(models, size: int, n: int, C: int = 10) -> dict:
    import torch

    import bench_zoo

    build = bench_zoo.builders(size)
    parts = []
    for want in models:
        name = next((k for k in build if k.startswith(want)), None)
        if name is None:
            parts.append({"part": want, "flops": 0.0, "rate": FP32_FLOPS_PER_S, "seconds": 0.0,
                          "note": "not available here (timm missing?)"})
            continue
        torch.manual_seed(0)
        fl = _flops(build[name]().eval(), size)
        f = zoo_flops(fl["forward"], fl["backward_one_logit"], n, C)
        parts.append({"part": name, "forward_flops": fl["forward"], "backward_one_logit_flops": fl["backward_one_logit"],
                      "flops": f, "rate": FP32_FLOPS_PER_S, "overhead_s": ZOO_ROW_OVERHEAD_S,
                      "seconds": f / FP32_FLOPS_PER_S + ZOO_ROW_OVERHEAD_S})
    return {"stage": "zoo", "size": size, "n": n, "formula": "process start + per model (zoo_flops / FP32 rate + "
            "ZOO_ROW_OVERHEAD_S)", "parts": parts, "seconds": PROCESS_OVERHEAD_S + sum(p["seconds"] for p in parts)}


def theory_flops(n: int, k: int, d: int, n_test: int, C: int, subspaces: int = 4) -> float:
    """reproduce's theory linear algebra per logit (float64, on the run's device), summed over C logits: the Σ_g Gram
    2·a²·b and eigvalsh (4/3)·a³ (a = min(n, k), b = max), the PCA directions (SVD 4·b·a² + 8·a³), and
    per subspace two row bases (SVD of [d, k]: 4·k·d² + 8·d³ each) and the projections of the Σ_g sample and
    the held-out features (2·n·k·d + 2·n_test·k·d)."""
    a, b = min(n, k), max(n, k)
    per = 2 * a * a * b + 4 / 3 * a ** 3 + 4 * b * a * a + 8 * a ** 3
    per += subspaces * (2 * (4 * k * d * d + 8 * d ** 3) + 2 * n * k * d + 2 * n_test * k * d)
    return C * per


def reproduce_sizes(setting: str, sets: list[str], flags: dict, n_train: int, n_val: int, classes: int,
                    image_size: int) -> dict:
    """The numbers the reproduce stage runs with, from reproduce's own config code (SETTINGS, EXTRA, --set)."""
    from dntk.cli import _overrides
    from dntk.pipeline.reproduce import ReproduceConfig

    overrides = {"image_size": image_size, "resize": None, **_overrides(list(sets))}   # the command's order
    rc = ReproduceConfig(data_root=".", setting=setting, overrides=overrides,
                         theory_images=flags.get("theory_images"), exact_train=flags.get("exact_train"),
                         exact_test=flags.get("exact_test"),
                         exact_memory_bytes=int(flags.get("exact_memory_gb", 6.0) * 2 ** 30))
    cfg = rc.run_config(base_model="teacher", gradient_distill="local-global")
    m = cfg.distill.ipc * classes
    n_test = min(cfg.data.n_test, n_val) if cfg.data.n_test else n_val
    return {"model": cfg.teacher.model, "stem": cfg.teacher.stem, "image_size": cfg.data.image_size,
            "n_train": n_train, "n_test": n_test, "classes": classes, "m": m, "epochs": cfg.teacher.epochs,
            "wmdd_iterations": cfg.distill.wmdd_iterations, "student_epochs": cfg.teacher.student_epochs,
            "k": cfg.features.k, "theory_images": min(rc.extra("theory_images"), n_train),
            "exact_train": min(rc.extra("exact_train"), m), "exact_test": min(rc.extra("exact_test"), n_test),
            "exact_ks": list(rc.extra("exact_ks")), "exact_memory_bytes": rc.exact_memory_bytes,
            "exact": flags.get("exact", True)}


def reproduce_plan(sz: dict) -> dict:
    """Per step of dntk reproduce: FLOPs (model_flops' forward F and one logit's backward B per image) over
    the rate of its kind of work."""
    from dntk.models import build_model

    model = build_model(sz["model"], sz["classes"], 3, sz["image_size"], stem=sz["stem"])
    fl = _flops(model, sz["image_size"])
    F, B = fl["forward"], fl["backward_one_logit"]
    P = sum(p.numel() for p in model.parameters() if p.requires_grad)
    k = sz["k"] if sz["k"] is not None else min(4096, P // 2)
    C, m, n_tr, n_te = sz["classes"], sz["m"], sz["n_train"], sz["n_test"]
    g = F + C * B                                        # one image's C per-logit gradients
    n_sub = sz["exact_train"] + sz["exact_test"]
    groups = -(-4 * C * n_sub * P // sz["exact_memory_bytes"])
    parts = [
        ("teacher", "epochs × n_train × 3F (a training step ≈ 3 forwards)", sz["epochs"] * n_tr * 3 * F,
         TRAIN_FLOPS_PER_S),
        ("WMDD", "iterations × IPC·C × 3F (forward + backward to the pixels) + 2·n_train·F (class features and BN "
         "statistics); the BN/feature losses are elementwise, not counted", sz["wmdd_iterations"] * m * 3 * F
         + 2 * n_tr * F, FP32_FLOPS_PER_S),
        ("student", "student_epochs × m × (3F + F) (student step + teacher relabelling forward)",
         sz["student_epochs"] * m * 4 * F, TRAIN_FLOPS_PER_S),
        ("features", "2 models × (m + n_test) × (F + C·B) (C per-logit gradients per image)", 2 * (m + n_te) * g,
         FP32_FLOPS_PER_S),
        ("theory features", "(2m + theory_images) × (F + C·B) (random and k-center subsets, Σ_g sample)",
         (2 * m + sz["theory_images"]) * g, FP32_FLOPS_PER_S),
        ("theory linear algebra (GPU float64)", "theory_flops(theory_images, k, m, n_test, C)",
         theory_flops(sz["theory_images"], k, m, n_te, C), GPU_F64_FLOPS_PER_S),
    ]
    if sz["exact"]:
        parts.append(("exact eNTK subset", f"⌈4·C·n·P / memory⌉ = {groups} slices × n × (F + C·B) + 2·C·n²·P + "
                      f"{len(sz['exact_ks'])} projections × n × (F + C·B), n = {n_sub}",
                      groups * n_sub * g + 2 * C * n_sub ** 2 * P + len(sz["exact_ks"]) * n_sub * g, FP32_FLOPS_PER_S))
    rows = [{"part": name, "formula": how, "flops": f, "rate": rate, "seconds": f / rate} for name, how, f, rate in parts]
    rows.append({"part": "other CPU work (Algorithm 1, clustering, KRR curves, figures)", "formula": "REPRODUCE_CPU_S",
                 "flops": None, "rate": None, "seconds": REPRODUCE_CPU_S})
    return {"stage": "reproduce", "sizes": {**sz, "k": k, "parameters": P}, "forward_flops": F,
            "backward_one_logit_flops": B, "formula": "process start + Σ parts", "parts": rows,
            "seconds": PROCESS_OVERHEAD_S + sum(r["seconds"] for r in rows)}


def make_plan(opts, manifest: dict) -> dict:
    C = len(manifest["classes"])
    n_train, n_val = manifest["splits"]["train"]["images"], manifest["splits"]["val"]["images"]
    sz = reproduce_sizes(opts.setting, opts.sets, opts.reproduce_flags, n_train, n_val, C, manifest["image_size"])
    stages = [cuda_tests_plan(), zoo_plan(opts.zoo_models, opts.zoo_size, opts.zoo_n, C), reproduce_plan(sz)]
    return {"rates": {"TRAIN_FLOPS_PER_S": TRAIN_FLOPS_PER_S, "FP32_FLOPS_PER_S": FP32_FLOPS_PER_S,
                      "GPU_F64_FLOPS_PER_S": GPU_F64_FLOPS_PER_S, "PROCESS_OVERHEAD_S": PROCESS_OVERHEAD_S,
                      "CUDA_TEST_S": CUDA_TEST_S, "ZOO_ROW_OVERHEAD_S": ZOO_ROW_OVERHEAD_S,
                      "REPRODUCE_CPU_S": REPRODUCE_CPU_S, "RESERVE_S": RESERVE_S},
            "stages": stages, "total_s": sum(s["seconds"] for s in stages)}


def plan_table(plan: dict, budget: float | None = None) -> str:
    lines = ["| stage | part | FLOPs | rate (FLOP/s) | estimate (s) |", "|---|---|---|---|---|"]
    total = 0.0
    for s in plan["stages"]:
        total += s["seconds"]
        fits = "" if budget is None else (" (fits)" if total <= budget else f" (cumulative {total:.0f} s > {budget:.0f} s)")
        lines.append(f"| **{s['stage']}** | {s['formula']} | | | **{s['seconds']:.0f}**{fits} |")
        for p in s["parts"]:
            fl = "–" if p.get("flops") is None else f"{p['flops']:.2e}"
            rate = "–" if p.get("rate") is None else f"{p['rate']:.1e}"
            lines.append(f"| | {p['part']} | {fl} | {rate} | {p['seconds']:.1f} |")
    lines.append(f"| **total** | | | | **{plan['total_s']:.0f}** |")
    return "\n".join(lines)


# ========================================================================================================
# run: the stages, each recorded as soon as it ends
# ========================================================================================================
class StageFailed(Exception):
    """A stage that ran and failed in a way it understands (test failures, a timeout): ``result`` is kept."""

    def __init__(self, message: str, result: dict | None = None):
        super().__init__(message)
        self.result = result or {}


class Suite:
    """suite.json under ``out``, rewritten atomically after every change; stages run most important first,
    each skipped when its estimate exceeds the time left of ``budget_s`` (unless ``force``)."""

    def __init__(self, out: Path, budget_s: float, *, doc: dict | None = None, force: bool = False,
                 clock=time.monotonic, log=print):
        self.out, self.budget, self.force, self.clock, self.log = Path(out), float(budget_s), force, clock, log
        self.t0 = clock()
        self.doc = {"suite": "benchmarks/gpu_suite.py", "budget_s": self.budget, "stages": [], "finished": False,
                    **(doc or {})}
        self.out.mkdir(parents=True, exist_ok=True)
        self.save()

    def elapsed(self) -> float:
        return self.clock() - self.t0

    def remaining(self) -> float:
        return self.budget - self.elapsed()

    def save(self) -> None:
        self.doc["elapsed_s"] = self.elapsed()
        atomic_json(self.doc, self.out / "suite.json")

    def stage(self, name: str, estimate_s: float, fn, *, skip_reason: str | None = None) -> dict:
        """Run ``fn(timeout_s)`` (→ a result dict) unless skipped; record status ok / failed / skipped."""
        rec = {"stage": name, "estimate_s": estimate_s}
        self.doc["stages"].append(rec)
        left = self.remaining()
        rec["remaining_at_start_s"] = left
        if skip_reason is None and estimate_s > left - RESERVE_S and not self.force:
            skip_reason = (f"the plan's estimate {estimate_s:.0f} s exceeds the {max(left - RESERVE_S, 0):.0f} s left "
                           f"of the {self.budget:.0f} s budget (after the {RESERVE_S:.0f} s reserve); --force runs it anyway")
        if skip_reason is not None:
            rec.update(status="skipped", reason=skip_reason)
            self.log(f"== {name}: skipped — {skip_reason}")
            self.save()
            return rec
        rec["status"] = "running"
        self.save()
        self.log(f"== {name}: estimate {estimate_s:.0f} s, {left:.0f} s left")
        t = self.clock()
        try:
            rec["result"] = fn(max(left - RESERVE_S, 1.0))
            rec["status"] = "ok"
        except StageFailed as e:
            rec.update(status="failed", error=str(e), result=e.result)
        except Exception as e:   # noqa: BLE001 — any failure is recorded and the next stage runs
            rec.update(status="failed", error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-4000:])
        rec["seconds"] = self.clock() - t
        self.log(f"== {name}: {rec['status']} in {rec['seconds']:.1f} s"
                 + (f" — {rec['error'][:300]}" if rec.get("error") else ""))
        self.save()
        return rec

    def finish(self) -> None:
        self.doc["finished"] = True
        self.save()


def run_logged(cmd: list[str], logfile: Path, timeout: float, env: dict | None = None, cwd: Path = ROOT) -> int:
    """Run cmd with its output appended to logfile; on timeout its whole process group is ended (it is
    started in a session of its own) and StageFailed raised."""
    with open(logfile, "a") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True)
        try:
            return p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    p.wait(timeout=10)
                    break
                except subprocess.TimeoutExpired:
                    continue
            raise StageFailed(f"timed out after {timeout:.0f} s: {' '.join(cmd[:6])} …") from None


def child_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([str(SRC)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env


def device_info(dry: bool) -> dict:
    import torch

    info = {"torch": torch.__version__, "cuda_build": torch.version.cuda, "python": platform.python_version(),
            "cpus": os.cpu_count(), "host": platform.node(), "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(name=torch.cuda.get_device_name(0), memory_gib=p.total_memory / 2 ** 30,
                    capability=f"{p.major}.{p.minor}", devices=torch.cuda.device_count(),
                    cudnn=torch.backends.cudnn.version())
    else:
        info["name"] = "cpu (dry run)" if dry else "cpu"
    try:
        import ot

        info["pot"] = ot.__version__
    except ImportError as e:
        info["pot"] = None
        info["pot_error"] = str(e)
    return info


def parse_junit(path: Path) -> dict:
    import xml.etree.ElementTree as ET

    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = counts.pop("failures")
    counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    cases, failures = [], []
    for tc in root.iter("testcase"):
        name = f"{tc.get('classname')}::{tc.get('name')}"
        outcome, text = "passed", None
        for tag in ("failure", "error", "skipped"):
            el = tc.find(tag)
            if el is not None:
                outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                text = (el.get("message") or "") + ("\n" + el.text if el.text and tag != "skipped" else "")
        cases.append({"test": name, "outcome": outcome, "seconds": float(tc.get("time", 0)),
                      **({"reason": text[:300]} if outcome == "skipped" else {})})
        if outcome in ("failed", "error"):
            failures.append({"test": name, "text": text[-3000:]})
    return {**counts, "cases": cases, "failure_texts": failures}


def stage_cuda_tests(opts, work: Path, logfile: Path, timeout: float) -> dict:
    xml = work / "cuda-tests.xml"
    xml.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-m", "cuda", "-q", "-rA", "-p", "no:cacheprovider", f"--junitxml={xml}",
           "tests"]
    rc = run_logged(cmd, logfile, timeout, env=child_env())
    if not xml.exists():
        raise StageFailed(f"pytest exited {rc} without a report")
    res = {"returncode": rc, **parse_junit(xml)}
    if res["tests"] and res["skipped"] == res["tests"]:
        res["note"] = "every CUDA test skipped (no CUDA device here)"
    if rc != 0 or res["failed"] or res["errors"]:
        raise StageFailed(f"pytest exited {rc}: {res['failed']} failed, {res['errors']} errors of {res['tests']} "
                          "CUDA tests", res)
    return res


def stage_zoo(opts, data_root: Path, work: Path, logfile: Path, timeout: float) -> dict:
    js = work / "zoo.json"
    js.unlink(missing_ok=True)
    cmd = [sys.executable, str(HERE / "bench_zoo.py"), "--device", opts.device, "--size", str(opts.zoo_size),
           "--n", str(opts.zoo_n), "--batch", str(opts.zoo_batch), "--k", str(opts.zoo_k),
           "--models", ",".join(opts.zoo_models), "--data-root", str(data_root), "--json", str(js)]
    if opts.threads:
        cmd += ["--threads", str(opts.threads)]
    rc = run_logged(cmd, logfile, timeout, env=child_env())
    if rc != 0 or not js.exists():
        raise StageFailed(f"bench_zoo.py exited {rc}")
    z = json.loads(js.read_text())
    keep = ("model", "P", "fast", "derived", "op_vjp", "ms_dntk", "ms_bare", "ratio", "peak_dntk_mb", "peak_bare_mb",
            "peak_kind", "kernel_err", "device")
    return {"machine": z["machine"], "args": z["args"], "rows": [{k: r.get(k) for k in keep} for r in z["rows"]]}


def _bundle(work: Path, out: Path) -> dict:
    """reproduce's report folder (report.md, its JSON, figures) and its steps' JSON records (cost ledger,
    results.json, training histories, distilled-set manifests: what a run cut short finished) into one
    out/reproduce.tar.gz (≤ 16 MiB comes back)."""
    tar = out / "reproduce.tar.gz"
    rep, ro = work / "report", work / "reproduce"
    members = [(p, f"report/{p.relative_to(rep)}") for p in sorted(rep.rglob("*")) if p.is_file()] if rep.exists() else []
    partial = [ro / "cost-ledger.json", ro / "results.json", *ro.glob("teacher/*.json"), *ro.glob("distill-*/manifest.json"),
               *ro.glob("student-*/*.json")] if ro.exists() else []
    members += [(p, f"records/{p.relative_to(ro)}") for p in partial if p.is_file()]
    tmp = out / ".reproduce.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as t:
        for p, arc in members:
            t.add(p, arcname=arc)
    if tmp.stat().st_size > 15.5 * 2 ** 20:   # drop the figures before anything else
        with tarfile.open(tmp, "w:gz") as t:
            for p, arc in members:
                if not arc.endswith(".png"):
                    t.add(p, arcname=arc)
    os.replace(tmp, tar)
    return {"bundle": tar.name, "bytes": tar.stat().st_size, "files": [a for _, a in members]}


def stage_reproduce(opts, data_root: Path, work: Path, out: Path, logfile: Path, manifest: dict, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "dntk", "reproduce", "--setting", opts.setting, "--data-root", str(data_root),
           "--device", opts.device, "--out", str(work / "reproduce"), "--report-dir", str(work / "report"), "--quiet",
           "--set", f"image_size={manifest['image_size']}", "--set", "resize=none"]
    for s in opts.sets:
        cmd += ["--set", s]
    f = opts.reproduce_flags
    for name in ("theory_images", "exact_train", "exact_test"):
        if f.get(name) is not None:
            cmd += [f"--{name.replace('_', '-')}", str(f[name])]
    cmd += ["--exact-memory-gb", str(f.get("exact_memory_gb", 6.0))]
    if not f.get("exact", True):
        cmd += ["--no-exact"]
    env = child_env()
    if opts.threads:
        env["OMP_NUM_THREADS"] = str(opts.threads)
    try:
        rc = run_logged(cmd, logfile, timeout, env=env)
    except StageFailed as e:
        e.result = {**_bundle(work, out), "note": "cut short: records/ in the bundle holds the steps that finished"}
        raise
    bundle = _bundle(work, out)
    summary = work / "report" / "reproduce.json"
    if rc != 0 or not summary.exists():
        raise StageFailed(f"dntk reproduce exited {rc}", bundle)
    s = json.loads(summary.read_text())
    return {**bundle, "command": " ".join(cmd[1:]), "teacher_accuracy": s["teacher_base"]["teacher_accuracy"],
            "claims": s.get("claims"), "costs": [{k: st.get(k) for k in ("stage", "flops", "seconds", "peak_gpu_mb")}
                                                 for st in s["costs"]["stages"]], "cuda": s.get("cuda")}


def run(opts) -> dict:
    import torch

    out = Path(opts.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    logfile = out / "suite.log"
    log = log_to(logfile)
    dev = device_info(opts.dry_run)
    if not opts.dry_run and not torch.cuda.is_available():
        raise SystemExit(f"gpu_suite run: no CUDA device here (torch {torch.__version__}, CUDA build "
                         f"{torch.version.cuda or 'none'}); `gpu_suite.py --dry-run` runs the same plan on the CPU")
    work = Path(opts.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    pack_dir = Path(opts.pack).resolve()
    if not (pack_dir / "manifest.json").exists():
        raise SystemExit(f"no pack at {pack_dir}: run `python benchmarks/gpu_suite.py pack` first (here)")
    manifest = json.loads((pack_dir / "manifest.json").read_text())
    suite = Suite(out, opts.budget, force=opts.force, log=log,
                  doc={"dry_run": opts.dry_run, "device": dev, "argv": sys.argv[1:],
                       "pack": {k: manifest.get(k) for k in ("subset", "image_size", "resize", "quality", "images_bytes",
                                                              "overall", "git_commit", "carry_bytes")},
                       "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")})
    log(f"gpu_suite on {dev['name']} (torch {dev['torch']}, {dev['cpus']} CPUs, POT {dev['pot']}); budget "
        f"{opts.budget:.0f} s; pack: {manifest['subset']}, WebP q{manifest['quality']}")
    # setup: the data as an ImageFolder, checked against the pack
    data_root = work / "imagenette"
    t = time.monotonic()
    setup = {}
    try:
        setup["unpack"] = unpack_images(pack_dir, data_root, log)
        setup["verify"] = verify_unpacked(pack_dir, data_root, work / "reproduce" / "cache",
                                          workers=min(8, os.cpu_count() or 1) if not opts.dry_run else 0)
        setup["data_ok"] = all(v["matches_pack"] for v in setup["verify"].values())
        counts = ", ".join(f"{k} {v['images']} images, {v['images_whose_pixel_sum_differs']} differ"
                           for k, v in setup["verify"].items())
        log(f"data: {'the packed pixels' if setup['data_ok'] else 'NOT the packed pixels'} ({counts})")
    except Exception as e:   # noqa: BLE001
        setup.update(data_ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-3000:])
        log(f"data setup failed: {setup['error']}")
    setup["seconds"] = time.monotonic() - t
    suite.doc["setup"] = setup
    try:
        plan = make_plan(opts, manifest)
    except Exception as e:   # noqa: BLE001 — e.g. a --set the reproduce config refuses: recorded, then stop
        suite.doc["plan_error"] = f"{type(e).__name__}: {e}"
        suite.finish()
        raise SystemExit(f"gpu_suite: the plan failed ({suite.doc['plan_error']}); nothing ran") from None
    suite.doc["plan"] = plan
    log("plan (estimates from model_flops and the rates in gpu_suite.py; cumulative against the budget):")
    log(plan_table(plan, opts.budget))
    suite.save()
    est = {s["stage"]: s["seconds"] for s in plan["stages"]}
    wanted = set(opts.stages)
    no_data = None if setup.get("data_ok") or setup.get("verify") else "the data could not be unpacked (see setup)"

    def why(name, needs_data=False):
        if name not in wanted:
            return "not selected (--stages)"
        return no_data if needs_data else None

    suite.stage("cuda_tests", est["cuda_tests"], lambda to: stage_cuda_tests(opts, work, logfile, to),
                skip_reason=why("cuda_tests"))
    suite.stage("zoo", est["zoo"], lambda to: stage_zoo(opts, data_root, work, logfile, to),
                skip_reason=why("zoo", True))
    pot = None if dev.get("pot") else f"POT is not importable ({dev.get('pot_error')}): WMDD needs it"
    suite.stage("reproduce", est["reproduce"],
                lambda to: stage_reproduce(opts, data_root, work, out, logfile, manifest, to),
                skip_reason=why("reproduce", True) or pot)
    suite.finish()
    for s in suite.doc["stages"]:
        log(f"{s['stage']:>12}: {s['status']}" + (f" ({s.get('seconds', 0):.0f} s of an estimated {s['estimate_s']:.0f} s)"
                                                   if s["status"] != "skipped" else f" — {s['reason']}"))
    log(f"suite.json written to {out}; {suite.elapsed():.0f} s of {opts.budget:.0f}")
    return suite.doc


# ========================================================================================================
# unpack: what came back, into benchmarks/results
# ========================================================================================================
def unpack(results: Path, dest: Path = RESULTS, *, allow_dry: bool = False, log=print) -> dict:
    results = Path(results)
    doc = json.loads((results / "suite.json").read_text())
    if doc.get("dry_run") and not allow_dry:
        raise SystemExit(f"{results}/suite.json is a dry run (device {doc['device']['name']}): not unpacked into "
                         f"{dest}; pass --dest DIR to unpack it elsewhere")
    dest.mkdir(parents=True, exist_ok=True)
    name = doc["device"].get("name")
    doc["unpacked"] = {"from": str(results), "at": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": name}
    atomic_json(doc, dest / "gpu_suite.json")
    copied = ["gpu_suite.json"]
    tar = results / "reproduce.tar.gz"
    if tar.exists():
        target = dest / "reproduce-paper160"
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(tar) as t:
            for mem in t.getmembers():
                if not mem.isfile() or mem.name.startswith("/") or ".." in Path(mem.name).parts:
                    continue
                rel = Path(mem.name)
                rel = rel.relative_to("report") if rel.parts[0] == "report" else rel
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                (target / rel).write_bytes(t.extractfile(mem).read())
                copied.append(f"reproduce-paper160/{rel}")
    log(f"unpacked results of {name} into {dest}: {len(copied)} files")
    for s in doc["stages"]:
        log(f"  {s['stage']}: {s['status']}" + (f" — {s.get('reason') or s.get('error')}" if s["status"] != "ok" else ""))
    return {"device": name, "files": copied}


# ========================================================================================================
def dry_run(opts) -> dict:
    """pack (a toy folder unless --pack names one) → run → unpack, all under the work folder, on the CPU."""
    work = Path(opts.work or tempfile.mkdtemp(prefix="dntk-gpu-dry-")).resolve()
    opts.work = str(work / "work")
    opts.out = opts.out or str(work / "out")
    if not opts.pack_given:
        toy = toy_folder(work / "toy")
        pack(toy, work / "pack", image_size=DRY["size"], resize=None, wheel=False, count_tree=False)
        opts.pack = str(work / "pack")
    doc = run(opts)
    unpack(Path(opts.out), work / "results", allow_dry=True)
    print(f"dry run under {work}")
    return doc


def build_parser():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("step", nargs="?", choices=["pack", "run", "unpack", "plan"], default=None)
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, everything under a temporary folder")
    g = ap.add_argument_group("pack")
    g.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data" / "imagenette2-224"))
    g.add_argument("--val", type=int, default=None, help="validation images packed (balanced; default: all)")
    g.add_argument("--quality", type=int, default=None, help="WebP quality (default: the highest that fits)")
    g.add_argument("--no-wheel", action="store_false", dest="wheel")
    g = ap.add_argument_group("run")
    g.add_argument("--out", default=None, help="where suite.json, suite.log and reproduce.tar.gz go ($OUT)")
    g.add_argument("--work", default=None, help="scratch folder: data, reproduce's OUT (default /tmp/dntk-gpu-suite)")
    g.add_argument("--pack", default=None, help=f"the pack to use (default {PACK.relative_to(ROOT)})")
    g.add_argument("--budget", type=float, default=540.0, help="seconds for the whole run (default 540)")
    g.add_argument("--force", action="store_true", help="run a stage even when its estimate exceeds the time left")
    g.add_argument("--stages", default="cuda_tests,zoo,reproduce", help="comma-separated subset, in this order")
    g.add_argument("--setting", default="paper160")
    g.add_argument("--set", action="append", default=[], dest="sets", metavar="NAME=VALUE",
                   help="passed to dntk reproduce (and used by the plan), e.g. --set wmdd_iterations=500")
    g.add_argument("--theory-images", type=int, default=None)
    g.add_argument("--exact-train", type=int, default=None)
    g.add_argument("--exact-test", type=int, default=None)
    g.add_argument("--exact-memory-gb", type=float, default=24.0,
                   help="GiB of gradients the exact eNTK holds at once on the GPU (default 24: 6 slices, not 21)")
    g.add_argument("--no-exact", action="store_false", dest="exact")
    g.add_argument("--zoo-models", default=",".join(GPU_ZOO_MODELS))
    g.add_argument("--zoo-size", type=int, default=160)
    g.add_argument("--zoo-n", type=int, default=64)
    g.add_argument("--zoo-batch", type=int, default=32)
    g.add_argument("--zoo-k", type=int, default=4096)
    g.add_argument("--threads", type=int, default=None, help="torch threads of the stages' processes")
    g = ap.add_argument_group("unpack")
    g.add_argument("--results", default=None, help="the folder the device's $OUT came back to")
    g.add_argument("--dest", default=None, help=f"default {RESULTS.relative_to(ROOT)}")
    return ap


def options(argv=None):
    ap = build_parser()
    o = ap.parse_args(argv)
    if o.step is None and not o.dry_run:
        ap.error("name a step (pack, run, unpack, plan) or pass --dry-run")
    if o.step == "run" and not o.dry_run and not o.out:
        ap.error("run needs --out (the device's $OUT)")
    o.pack_given = o.pack is not None
    o.pack = o.pack or str(PACK)
    o.zoo_models = tuple(m.strip() for m in o.zoo_models.split(",") if m.strip())
    o.stages = tuple(s.strip() for s in o.stages.split(",") if s.strip())
    unknown = set(o.stages) - {"cuda_tests", "zoo", "reproduce"}
    if unknown:
        ap.error(f"--stages: unknown {', '.join(sorted(unknown))}")
    o.device = "cpu" if o.dry_run else "cuda"
    if o.dry_run:   # toy sizes for every stage; the user's --set come after (and win)
        o.sets = list(DRY["sets"]) + o.sets
        o.zoo_models = DRY["zoo_models"] if o.zoo_models == GPU_ZOO_MODELS else o.zoo_models
        o.zoo_n, o.zoo_batch, o.zoo_k = DRY["zoo_n"], DRY["zoo_batch"], DRY["zoo_k"]
        o.zoo_size = DRY["size"]
        o.threads = o.threads or 1
        for name in ("theory_images", "exact_train", "exact_test"):
            if getattr(o, name) is None:
                setattr(o, name, DRY[name])
        o.exact_memory_gb = DRY["exact_memory_gb"]
    o.reproduce_flags = {"theory_images": o.theory_images, "exact_train": o.exact_train, "exact_test": o.exact_test,
                         "exact_memory_gb": o.exact_memory_gb, "exact": o.exact}
    return o


def main(argv=None):
    o = options(argv)
    if o.dry_run:
        return dry_run(o)
    if o.step == "pack":
        return pack(o.data_root, val=o.val, quality=o.quality, wheel=o.wheel)
    if o.step == "run":
        o.work = o.work or str(Path(tempfile.gettempdir()) / "dntk-gpu-suite")
        return run(o)
    if o.step == "unpack":
        if not o.results:
            raise SystemExit("unpack needs --results DIR (the device's $OUT, fetched here)")
        return unpack(Path(o.results), Path(o.dest) if o.dest else RESULTS, allow_dry=o.dest is not None)
    # plan: from the pack, or ImageNette's counts at the paper160 input when there is none
    pk = Path(o.pack)
    manifest = json.loads((pk / "manifest.json").read_text()) if (pk / "manifest.json").exists() else {
        "classes": [str(c) for c in range(10)], "image_size": 160,
        "splits": {"train": {"images": 9469}, "val": {"images": 3925}}}
    p = make_plan(o, manifest)
    print(plan_table(p, o.budget))
    return p


def render(manifest: dict) -> str:
    """The benchmarks page's pack line and plan table (block ``gpu-plan``) from the pack's manifest, checked in as
    benchmarks/results/gpu_pack.json: what the pack measured (size, pixel error against the library's decoded
    images) and the plan ``plan`` prints for it at the default budget."""
    tr, va = manifest["splits"]["train"], manifest["splits"]["val"]
    n, size = tr["images"] + va["images"], tr["bytes"] + va["bytes"]
    err = max((tr, va), key=lambda x: x["mean_abs_error"])
    o = options(["plan"])
    lines = [f"**Pack** (`gpu_suite.py pack`, `benchmarks/results/gpu_pack.json`): {tr['images']:,} + {va['images']:,} images at "
             f"{manifest['image_size']} px, {manifest['format'].upper()} quality {manifest['quality']}, {size / 2 ** 20:.1f} MiB, "
             f"{size / n / 1024:.1f} KiB per image; against the library's decoded uint8, mean |error| up to "
             f"{err['mean_abs_error']:.2f} of 255 (max {max(tr['max_abs_error'], va['max_abs_error'])}, PSNR "
             f"{min(tr['psnr_db'], va['psnr_db']):.1f} dB).", "",
             f"**Plan** (`python3 benchmarks/gpu_suite.py plan`, budget {o.budget:.0f} s):", "",
             plan_table(make_plan(o, manifest), o.budget)]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
