"""Real-image baselines at the same size m = IPC × C: a random subset, and k-center greedy in the
teacher's penultimate feature space (per class)."""

from __future__ import annotations

import time

import torch

from .. import samples
from ..data.images import ImageSet
from ..resources import peak_rss_mb, reset_peak_rss
from .distilled import DistilledSet, check_ipc, save_distilled
from .wmdd import class_features


def kcenter_greedy(features: torch.Tensor, k: int, first: int = 0) -> list[int]:
    """k-center greedy: start at ``first``, repeatedly add the point farthest from the chosen set.
    Returns k distinct indices; the covering radius max_i min_j ‖f_i − f_j‖ is what it reduces."""
    X = features.double()
    picks = [first]
    dist = ((X - X[first]) ** 2).sum(1)
    for _ in range(k - 1):
        nxt = int(torch.argmax(dist))
        picks.append(nxt)
        dist = torch.minimum(dist, ((X - X[nxt]) ** 2).sum(1))
    return picks


def covering_radius(features: torch.Tensor, picks: list[int]) -> float:
    X = features.double()
    return float(torch.cdist(X, X[picks]).min(1).values.max())


def select_real(dataset: ImageSet, ipc: int, method: str, *, teacher=None, seed: int = 0, out_dir=None,
                device="cpu") -> DistilledSet:
    """``random``: ipc random images per class (seeded); ``kcenter``: k-center greedy per class on
    teacher features, started at a seeded random image."""
    check_ipc(dataset, ipc)
    reset_peak_rss()
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    chosen = []
    for c in range(dataset.num_classes):
        idx = torch.nonzero(dataset.labels == c).flatten()
        if method == "random":
            chosen.append(idx[torch.randperm(idx.numel(), generator=gen)[:ipc]])
        elif method == "kcenter":
            if teacher is None:
                raise ValueError("kcenter needs the teacher")
            x, _ = dataset.tensors(idx)
            f = class_features(teacher.to(device), samples.to(x, device)).cpu()
            first = int(torch.randint(idx.numel(), (1,), generator=gen))
            chosen.append(idx[torch.tensor(kcenter_greedy(f, ipc, first))])
        else:
            from ..errors import DNTKError

            raise DNTKError(f"unknown coreset method {method!r}; use 'random' or 'kcenter'")
    index = torch.cat(chosen)
    x, y = dataset.tensors(index)
    ds = DistilledSet.from_normalised(x, y, dataset, method)
    if out_dir is not None:
        save_distilled(ds, out_dir, {"method": method, "settings": {"ipc": ipc, "seed": seed},
                                     "indices": index.tolist(), "seconds": time.perf_counter() - t0,
                                     "peak_memory_mb": peak_rss_mb()})
    return ds
