"""In-memory image sets: decoded once, stored as uint8, normalised on access.

Every dataset dntk uses becomes an :class:`ImageSet` — images uint8 [n, c, h, w], labels int64 [n],
class names, and the per-channel mean/std used to normalise. Decoding JPEGs is the slow part of
every epoch on a 2-core machine, so folders are decoded once (optionally cached to disk) and all
later work — training epochs, feature passes — reads tensors.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.data import Dataset

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class ImageSet(Dataset):
    """images: uint8 [n, c, h, w]; labels: int64 [n]; classes: names, index = label.

    ``ds[i]`` returns (float32 [c, h, w] normalised with mean/std, label).
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    name: str = "images"
    files: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError("ImageSet.images must be uint8 [n, c, h, w]")
        self._mean = torch.tensor(self.mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(self.std, dtype=torch.float32).view(-1, 1, 1)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i):
        return self.normalize(self.images[i]), self.labels[i]

    def normalize(self, u8: torch.Tensor) -> torch.Tensor:
        """uint8 [..., c, h, w] -> normalised float32."""
        return (u8.float().div_(255.0) - self._mean) / self._std

    def tensors(self, index=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised float32 images [m, c, h, w], labels [m]) for the given indices (default all)."""
        if index is None:
            return self.normalize(self.images), self.labels.clone()
        index = torch.as_tensor(index, dtype=torch.long)
        return self.normalize(self.images[index]), self.labels[index]

    def subset(self, index) -> "ImageSet":
        index = torch.as_tensor(index, dtype=torch.long)
        files = [self.files[i] for i in index.tolist()] if self.files else []
        return ImageSet(self.images[index], self.labels[index], list(self.classes), self.mean, self.std, self.name, files)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()


def balanced_indices(labels: torch.Tensor, m: int, num_classes: int, seed: int | None = None) -> torch.Tensor:
    """m indices spread evenly across classes (the first ⌈m/C⌉ or ⌊m/C⌋ of each class, in dataset
    order, or a seeded random choice when seed is given). Classes are visited in order, so the
    first m mod C classes get one extra point."""
    from ..errors import DNTKError

    counts = torch.bincount(labels, minlength=num_classes)
    if m > labels.numel():
        raise DNTKError(f"m={m} is larger than the training set ({labels.numel()} images); choose m ≤ {labels.numel()}")
    base, extra = divmod(m, num_classes)
    picks = []
    for c in range(num_classes):
        want = base + (1 if c < extra else 0)
        idx = torch.nonzero(labels == c).flatten()
        if want > idx.numel():
            raise DNTKError(f"m={m} needs {want} images of class {c} but the training set has {idx.numel()}; "
                            f"choose m ≤ {num_classes * int(counts.min())} for an even split")
        if seed is not None:
            idx = idx[torch.randperm(idx.numel(), generator=torch.Generator().manual_seed(seed + c))]
        picks.append(idx[:want])
    # interleave classes round-robin so that any prefix of length j·C is itself balanced
    order = [p[r] for r in range(base + 1) for p in picks if r < len(p)]
    return torch.stack(order) if order else torch.zeros(0, dtype=torch.long)
