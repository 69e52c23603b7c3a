"""Models: any classifier named by ``--model`` (built-ins, torchvision, timm, Hugging Face folders, user
factories), the built-in ResNet-18 / small CNN, and checkpoint loading that reads what people save."""

from .networks import (MODELS, SmallCNN, build_model, forward_with_penultimate, load_checkpoint, normalize_state_dict,
                       penultimate, read_state_dict, resnet18)
from .registry import BUILTIN, ModelSpec, build_model_spec, call_factory, hf_config, pad_token_id, parse_model, require_extra

__all__ = ["MODELS", "SmallCNN", "resnet18", "build_model", "load_checkpoint", "normalize_state_dict", "penultimate",
           "forward_with_penultimate", "read_state_dict", "BUILTIN", "ModelSpec", "build_model_spec", "call_factory",
           "hf_config", "pad_token_id", "parse_model", "require_extra"]
