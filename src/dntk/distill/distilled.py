"""Distilled sets on disk: one tensor file, a JSON manifest and a PNG grid per class.

Every distiller (WMDD, random real subset, k-center) writes the same format, so every later stage
accepts any of them:

    OUT/distilled.pt     {"images": float32 [m, c, h, w] (normalised), "labels": int64 [m],
                          "classes": [...], "mean", "std", "dataset", "method"}
    OUT/manifest.json    settings, per-class records, time, peak memory, teacher checksum
    OUT/grid-<class>.png the class's images, de-normalised
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .. import samples
from ..data.images import ImageSet
from ..errors import DNTKError
from ..store import atomic_json, atomic_save, load


def check_ipc(dataset: ImageSet, ipc: int):
    if not isinstance(ipc, int) or ipc < 1:
        raise DNTKError(f"ipc must be a positive integer, got {ipc!r}")
    counts = dataset.class_counts()
    missing = [dataset.classes[c] for c, n in enumerate(counts) if n == 0]
    if missing:
        raise DNTKError(f"classes {missing} have no images in the training data; every class needs images to distil")
    small = [(dataset.classes[c], n) for c, n in enumerate(counts) if n < ipc]
    if small:
        raise DNTKError(f"ipc={ipc} is larger than the image count of classes {small[:5]}; choose ipc ≤ {min(counts)}")


@dataclass
class DistilledSet:
    """images: the m samples — normalised float32 [m, c, h, w] for image data, else any sample batch of
    :mod:`dntk.samples` (a real subset of token data: a dict of token ids); labels int64 [m]; the class
    list and (images) normalisation of the dataset it was distilled from."""

    images: object
    labels: torch.Tensor
    classes: list
    mean: tuple
    std: tuple
    dataset: str
    method: str

    @classmethod
    def from_normalised(cls, images, labels, source, method: str) -> "DistilledSet":
        if isinstance(images, torch.Tensor) and images.is_floating_point():
            images = images.float().contiguous()
        return cls(images, labels.long(), list(source.classes), tuple(getattr(source, "mean", ())),
                   tuple(getattr(source, "std", ())), source.name, method)

    def __len__(self):
        return samples.count(self.images)

    def __getitem__(self, i):
        return samples.map_leaves(lambda t: t[0], samples.take(self.images, [i])), self.labels[i]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self):
        """[c, h, w] of image data, None for other inputs."""
        return tuple(self.images.shape[1:]) if samples.is_images(self.images) else None

    def tensors(self, index=None):
        if index is None:
            return samples.map_leaves(torch.clone, self.images), self.labels.clone()
        index = torch.as_tensor(index, dtype=torch.long)
        return samples.take(self.images, index), self.labels[index]

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    def to_uint8(self) -> torch.Tensor:
        if not samples.is_images(self.images) or not self.mean:
            raise DNTKError("to_uint8 needs image data with its normalisation")
        m = torch.tensor(self.mean).view(1, -1, 1, 1)
        s = torch.tensor(self.std).view(1, -1, 1, 1)
        return ((self.images * s + m).clamp(0, 1) * 255).round().to(torch.uint8)

    def check_compatible(self, dataset):
        """Raise unless this set was distilled from data with the same classes and image shape."""
        if list(self.classes) != list(dataset.classes):
            raise DNTKError(f"the distilled set has {len(self.classes)} classes ({', '.join(map(str, self.classes[:4]))}…) "
                            f"but the data has {dataset.num_classes} ({', '.join(map(str, dataset.classes[:4]))}…); "
                            "distil from the same dataset, or point --distilled at the right folder")
        theirs = getattr(dataset, "image_shape", None)
        if self.image_shape is not None and theirs is not None and tuple(self.image_shape) != tuple(theirs):
            raise DNTKError(f"the distilled images are {self.image_shape} but the data's are {theirs}; "
                            "use the same --image-size")
        if (self.image_shape is None) != (theirs is None):
            raise DNTKError("the distilled set and the data differ in kind (images vs other inputs); distil from the "
                            "same dataset")


def save_distilled(ds: DistilledSet, out_dir, manifest: dict, grids: bool = True) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    images = ds.images if isinstance(ds.images, torch.Tensor) else samples.to_plain(ds.images)
    blob = {"images": images, "labels": ds.labels, "classes": ds.classes, "mean": list(ds.mean), "std": list(ds.std),
            "dataset": ds.dataset, "method": ds.method}
    atomic_save(blob, out_dir / "distilled.pt")
    manifest = {**manifest, "n": len(ds), "classes": ds.classes, "class_counts": ds.class_counts(),
                "image_shape": list(ds.image_shape) if ds.image_shape is not None else None,
                "inputs": samples.describe(ds.images), "dataset": ds.dataset}
    atomic_json(manifest, out_dir / "manifest.json", indent=1)
    if grids and ds.image_shape is not None and ds.mean:
        from torchvision.utils import save_image

        u8 = ds.to_uint8()
        for c, name in enumerate(ds.classes):
            imgs = u8[ds.labels == c]
            if len(imgs):
                save_image(imgs.float() / 255, out_dir / f"grid-{c:02d}-{_safe(name)}.png", nrow=10)
    return out_dir / "distilled.pt"


def _safe(name) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(name))[:40]


def load_distilled(path) -> DistilledSet:
    path = Path(path)
    f = path / "distilled.pt" if path.is_dir() else path
    if not f.exists():
        raise DNTKError(f"no distilled set at {f}; run `dntk distill` first or point at its output folder")
    try:
        blob = load(f, trusted=False)  # a user-supplied file: tensors, lists and strings only
    except Exception as e:   # torn, empty or not a torch file: EOFError, RuntimeError, UnpicklingError, ...
        raise DNTKError(f"{f} is not a readable distilled set ({type(e).__name__}: {e}); distil it again "
                        "(`dntk distill`) or point at another folder") from None
    return DistilledSet(samples.from_plain(blob["images"]), blob["labels"], blob["classes"], tuple(blob["mean"]), tuple(blob["std"]),
                        blob["dataset"], blob["method"])
