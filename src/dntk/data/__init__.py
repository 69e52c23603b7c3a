"""Data: the embedded digits default, ImageFolder trees, Imagenette (ImageSets); any torch Dataset and
tokenized Hugging Face datasets folders (SampleSets)."""

from .images import IMAGENET_MEAN, IMAGENET_STD, ImageSet, balanced_indices
from .sets import SampleSet, as_sample_set, hf_disk
from .sources import DATASETS, digits, folder_sample, image_folder, imagenette, load_configured, load_split, load_splits, scan_folder

__all__ = ["ImageSet", "SampleSet", "as_sample_set", "hf_disk", "balanced_indices", "digits",
           "image_folder", "imagenette", "load_split", "load_splits", "load_configured", "scan_folder", "folder_sample",
           "DATASETS", "IMAGENET_MEAN", "IMAGENET_STD"]
