"""Where images come from: scikit-learn's digits (embedded default), ImageFolder trees, torchvision's
Imagenette. Each loader returns :class:`~dntk.data.images.ImageSet` splits."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import DNTKError
from ..store import atomic_save, digest, load, load_or_none
from .images import IMAGENET_MEAN, IMAGENET_STD, ImageSet, balanced_indices

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DATASETS = ("digits", "folder", "imagenette", "hf-disk")


# --- embedded default -----------------------------------------------------------------------------
def digits(split: str = "train", test_fraction: float = 0.25, seed: int = 0) -> ImageSet:
    """scikit-learn's 1,797 handwritten digits (8×8 greyscale, 10 classes; ships with sklearn, no
    download). A stratified, seeded train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    _check_split(split)
    bunch = load_digits()
    images = torch.from_numpy((bunch.images * (255.0 / 16.0)).round()).to(torch.uint8).unsqueeze(1)
    labels = torch.from_numpy(bunch.target).long()
    idx_train, idx_test = train_test_split(range(len(labels)), test_size=test_fraction, random_state=seed,
                                           stratify=bunch.target)
    idx = torch.tensor(sorted(idx_train if split == "train" else idx_test))
    # statistics of the training split, so that train and test share one normalisation
    tr = images[torch.tensor(sorted(idx_train))].float() / 255
    return ImageSet(images[idx], labels[idx], [str(d) for d in range(10)], (float(tr.mean()),), (float(tr.std()),),
                    name="digits")


# --- ImageFolder trees --------------------------------------------------------------------------------
def _check_split(split):
    if split not in ("train", "val", "test"):
        raise DNTKError(f"unknown split {split!r}; use 'train' or 'val'")


def _split_dir(root: Path, split: str) -> Path:
    if not root.exists():
        raise DNTKError(f"data folder {root} does not exist; pass --data-root pointing at a folder with train/ and val/ "
                        "sub-folders (ImageFolder layout: split/class/image.jpg)")
    names = [split] + (["test"] if split == "val" else ["val"] if split == "test" else [])
    for name in names:
        if (root / name).is_dir():
            return root / name
    sub = sorted(p.name for p in root.iterdir() if p.is_dir())
    raise DNTKError(f"{root} has no '{split}' folder (found: {', '.join(sub) or 'no folders'}); the layout must be "
                    f"{root}/train/<class>/*.jpg and {root}/val/<class>/*.jpg")


_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}   # (absolute path, size, mtime_ns) → SHA-1 of the bytes


def file_digests(paths) -> list[tuple[int, str]]:
    """(size, SHA-1 of the bytes) of each file, in the order given: the content key of image files, so a
    copy, a re-provisioned or ``touch``-ed folder keys the same and an edited image (even within the same
    modification time) keys anew. Remembered in the process by (path, size, mtime_ns), so a file is read
    once per process. Cost: reads every file (≈ 0.3 s for ImageNette's 160 MB from the page cache)."""
    import hashlib

    out = []
    for p in paths:
        st = os.stat(p)
        key = (os.path.abspath(p), st.st_size, st.st_mtime_ns)
        if key not in _FILE_DIGESTS:
            h = hashlib.sha1()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            _FILE_DIGESTS[key] = h.hexdigest()
        out.append((st.st_size, _FILE_DIGESTS[key]))
    return out


def folder_content_key(paths) -> list[tuple[str, int, str]]:
    """(path relative to the files' common folder, size, SHA-1) per file: the same files under another
    root, through a relative path or after their modification times changed give the same key."""
    absolute = [os.path.abspath(p) for p in paths]
    root = os.path.commonpath(absolute) if len(absolute) > 1 else os.path.dirname(absolute[0]) if absolute else ""
    return [(os.path.relpath(a, root), size, h) for a, (size, h) in zip(absolute, file_digests(absolute))]


def scan_folder(root, split: str) -> tuple[list[str], list[tuple[str, int]]]:
    """Class names (sorted folder names) and (path, label) pairs of one split."""
    _check_split(split)
    d = _split_dir(Path(root), split)
    classes = sorted(p.name for p in d.iterdir() if p.is_dir())
    if not classes:
        raise DNTKError(f"{d} has no class sub-folders; expected {d}/<class>/<image files>")
    samples = []
    for label, cls in enumerate(classes):
        for dirpath, _, files in sorted(os.walk(d / cls)):
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((str(Path(dirpath) / f), label))
    if not samples:
        raise DNTKError(f"{d} has class folders ({', '.join(classes[:5])}…) but no image files "
                        f"({', '.join(IMAGE_EXTENSIONS)}); check --data-root")
    have = {label for _, label in samples}
    empty = [d / classes[c] for c in range(len(classes)) if c not in have]
    if empty:
        raise DNTKError(f"class folder{'s' if len(empty) > 1 else ''} {', '.join(map(str, empty[:5]))} "
                        f"{'hold' if len(empty) > 1 else 'holds'} no image files ({', '.join(IMAGE_EXTENSIONS)}); "
                        "add images or remove the folder — every class needs samples in every split")
    if len(classes) < 2:
        raise DNTKError(f"{d} has one class folder ({classes[0]}); a classifier's kernel needs at least two classes")
    return classes, samples


def _decode(path: str, image_size: int, resize: int | None):
    from PIL import Image, UnidentifiedImageError
    from torchvision.transforms import functional as TF

    try:
        with Image.open(path) as im:
            if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
                # 16-bit / 32-bit greyscale: PIL's convert("RGB") clips these to 255 (an all-white image);
                # scale by the mode's range instead
                import numpy as np

                a = np.asarray(im, dtype=np.float64)
                top = 65535.0 if im.mode.startswith("I;16") else max(float(a.max()), 1.0)
                im = Image.fromarray(np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
            im = im.convert("RGB")  # greyscale and CMYK photos exist in ImageNet-derived sets
            im = TF.resize(im, resize or image_size, antialias=True)
            im = TF.center_crop(im, image_size)
            return TF.pil_to_tensor(im)
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DNTKError(f"cannot read image {path}: {e}. Delete or replace the file (dntk stops rather than "
                        "silently training on a different set)") from None


class _DecodeDataset(torch.utils.data.Dataset):
    def __init__(self, samples, image_size, resize):
        self.samples, self.image_size, self.resize = samples, image_size, resize

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return _decode(self.samples[i][0], self.image_size, self.resize)


def image_folder(root, split: str = "train", image_size: int = 64, *, resize: int | None = None,
                 cache_dir=None, workers: int | None = None, progress: bool = False,
                 mean=IMAGENET_MEAN, std=IMAGENET_STD) -> ImageSet:
    """An ImageFolder split, decoded to RGB, resized (shorter side to ``resize``, default
    image_size) and centre-cropped to image_size × image_size.

    With ``cache_dir``, the decoded uint8 tensor is saved there (keyed by the files' content, relative
    paths and labels: :func:`folder_content_key`) and reused on the next call.
    """
    if image_size < 8:
        raise DNTKError(f"image_size={image_size} is too small; use ≥ 8 pixels")
    classes, samples = scan_folder(root, split)
    key = None
    if cache_dir is not None:
        h = digest([image_size, resize, split, folder_content_key([p for p, _ in samples]),
                    [y for _, y in samples], classes])
        key = Path(cache_dir) / f"{Path(root).name}-{split}-{image_size}px-{h}.pt"
        blob = load_or_none(key, what="decoding the images again")
        if blob is not None:
            return ImageSet(blob["images"], blob["labels"], blob["classes"], tuple(mean), tuple(std),
                            name=Path(root).name, files=[p for p, _ in samples])
    workers = min(2, os.cpu_count() or 1) if workers is None else workers
    loader = torch.utils.data.DataLoader(_DecodeDataset(samples, image_size, resize), batch_size=64,
                                         num_workers=workers if len(samples) > 256 else 0)
    chunks = []
    for batch in tqdm(loader, desc=f"decoding {Path(root).name}/{split}", disable=not progress, unit="batch"):
        chunks.append(batch)
    images = torch.cat(chunks)
    labels = torch.tensor([y for _, y in samples], dtype=torch.long)
    if key is not None:
        atomic_save({"images": images, "labels": labels, "classes": classes}, key)
    return ImageSet(images, labels, classes, tuple(mean), tuple(std), name=Path(root).name, files=[p for p, _ in samples])


def folder_sample(root, split: str, image_size: int, n: int, *, resize: int | None = None) -> tuple[ImageSet, int]:
    """n images of an ImageFolder split, spread evenly over its file list, decoded as
    :func:`image_folder` decodes them — and the split's total image count. For measuring costs on
    a few images without decoding the whole split."""
    classes, samples = scan_folder(root, split)
    pick = torch.linspace(0, len(samples) - 1, min(n, len(samples))).round().long().tolist()
    images = torch.stack([_decode(samples[i][0], image_size, resize) for i in pick])
    labels = torch.tensor([samples[i][1] for i in pick], dtype=torch.long)
    return ImageSet(images, labels, classes, name=Path(root).name), len(samples)


def imagenette(root, split: str = "train", image_size: int = 64, *, download: bool = False, **kw) -> ImageSet:
    """Imagenette from a local ImageFolder tree (``root/train``, ``root/val``), or torchvision's
    ``Imagenette`` download (needs network; ``download=True``) stored under root."""
    root = Path(root)
    if (root / "train").is_dir():
        return image_folder(root, split, image_size, **kw)
    for sub in ("imagenette2", "imagenette2-320", "imagenette2-160"):
        if (root / sub / "train").is_dir():
            return image_folder(root / sub, split, image_size, **kw)
    if not download:
        raise DNTKError(f"no Imagenette found under {root}; point --data-root at an extracted imagenette2 folder "
                        "(with train/ and val/) or pass --download to fetch it with torchvision")
    from torchvision.datasets import Imagenette

    Imagenette(str(root), split="train" if split == "train" else "val", size="full", download=True)
    return imagenette(root, split, image_size, download=False, **kw)


def load_split(name: str, split: str, *, root=None, image_size: int | None = None, **kw) -> ImageSet:
    """One split of a named dataset: ``digits`` (embedded), ``folder`` (ImageFolder at root),
    ``imagenette`` (local tree or torchvision download)."""
    download = kw.pop("download", False)
    if name == "digits":
        if root is not None:
            raise DNTKError("the digits dataset is embedded in scikit-learn; drop --data-root or use --dataset folder")
        if image_size not in (None, 8):
            raise DNTKError(f"the digits are 8 × 8 pixels; --image-size {image_size} does not apply to them (drop it, or "
                            "use --dataset folder for images of another size)")
        if kw.get("resize") is not None:
            raise DNTKError("the digits are 8 × 8 pixels and are not resized; drop --resize")
        return digits(split)
    if name in ("folder", "imagefolder"):
        if root is None:
            raise DNTKError("--dataset folder needs --data-root pointing at an ImageFolder tree (train/ and val/)")
        return image_folder(root, split, image_size or 64, **kw)
    if name == "imagenette":
        if root is None:
            raise DNTKError("--dataset imagenette needs --data-root (a local imagenette2 folder, or where to download it)")
        return imagenette(root, split, image_size or 64, download=download, **kw)
    raise DNTKError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")


def load_splits(name: str, *, root=None, image_size: int | None = None, **kw) -> tuple[ImageSet, ImageSet]:
    """(train, val) of a dataset, checked to have the same classes in the same order."""
    train = load_split(name, "train", root=root, image_size=image_size, **kw)
    val = load_split(name, "val", root=root, image_size=image_size, **kw)
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DNTKError(f"train and val class folders differ (only in train: {only_train or '-'}; only in val: "
                        f"{only_val or '-'}); both splits need the same class sub-folders")
    return train, val


def load_configured(cfg, *, cache_dir=None, progress: bool = True, split: str | None = None, pad_id: int = 0):
    """The data of a :class:`dntk.config.DataConfig`: (train, test) — the test split cut to
    ``cfg.n_test`` images even across classes — or one ``split``. ``cache_dir`` keeps decoded images
    (ImageFolder data only; ignored when ``cfg.cache_data`` is False). ``hf-disk`` data
    (:func:`dntk.data.sets.hf_disk`) is padded with ``pad_id`` (the model's pad token)."""
    if cfg.dataset == "hf-disk":
        from .sets import hf_disk

        if cfg.data_root is None:
            raise DNTKError("--dataset hf-disk needs --data-root: a folder written by DatasetDict.save_to_disk")
        train, test = hf_disk(cfg.data_root, max_length=cfg.max_length, pad_id=pad_id, n_test=cfg.n_test)
        return test if split in ("val", "test") else train if split == "train" else (train, test)
    if getattr(cfg, "max_length", None) is not None:
        raise DNTKError("--max-length applies to token data (--dataset hf-disk); drop it for images")
    kw = {}
    if cfg.dataset == "digits" and cfg.resize is not None:
        kw["resize"] = cfg.resize   # refused by load_split: the digits are not resized
    if cfg.dataset != "digits":
        kw = {"download": cfg.download, "progress": progress}
        if cfg.resize is not None:
            kw["resize"] = cfg.resize
        if cfg.cache_data and cache_dir is not None:
            kw["cache_dir"] = cache_dir
    if split is not None:
        return load_split(cfg.dataset, split, root=cfg.data_root, image_size=cfg.image_size, **kw)
    train, test = load_splits(cfg.dataset, root=cfg.data_root, image_size=cfg.image_size, **kw)
    if cfg.n_test is not None:
        test = test.subset(balanced_indices(test.labels, min(cfg.n_test, len(test)), test.num_classes))
    return train, test
