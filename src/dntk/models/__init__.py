"""Models: torchvision ResNet-18 (with a small-input stem for ≤ 64 px), a small CNN for the
embedded default, and checkpoint loading that understands the common key layouts."""

from .networks import (MODELS, SmallCNN, build_model, forward_with_penultimate, load_checkpoint, normalize_state_dict,
                       penultimate, resnet18)

__all__ = ["MODELS", "SmallCNN", "resnet18", "build_model", "load_checkpoint", "normalize_state_dict", "penultimate",
           "forward_with_penultimate"]
