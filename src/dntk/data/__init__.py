"""Data: the embedded digits default, ImageFolder trees, Imagenette; all as in-memory ImageSets."""

from .images import IMAGENET_MEAN, IMAGENET_STD, ImageSet, balanced_indices
from .sources import DATASETS, digits, folder_sample, image_folder, imagenette, load_configured, load_split, load_splits, scan_folder

__all__ = ["ImageSet", "balanced_indices", "digits", "image_folder", "imagenette", "load_split", "load_splits", "load_configured",
           "scan_folder", "folder_sample", "DATASETS", "IMAGENET_MEAN", "IMAGENET_STD"]
