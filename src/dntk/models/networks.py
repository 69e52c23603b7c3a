"""Models: torchvision ResNet-18 (with a small-input stem for ≤ 64 px), a small CNN for the
embedded default, and checkpoint loading that understands the common key layouts."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

from ..errors import DNTKError

MODELS = ("resnet18", "small_cnn")


class SmallCNN(nn.Module):
    """conv(c→32)-BN-ReLU ×2 (second strided), conv(→64, /2)-BN-ReLU, global average pool,
    linear head; about 60k parameters. ``features`` returns the penultimate activations [B, 64]."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 32):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.Conv2d(w, w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * w), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(2 * w, num_classes)

    def features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.fc(self.body(x))


def resnet18(num_classes: int = 10, in_channels: int = 3, image_size: int = 224, stem: str = "auto"):
    """torchvision ResNet-18 with ``num_classes`` outputs.

    stem: ``"small"`` replaces the 7×7/2 conv by a 3×3/1 conv (and drops the max-pool for inputs
    ≤ 32 px), so small images keep spatial detail; ``"imagenet"`` keeps torchvision's stem;
    ``"auto"`` (default) is small for inputs ≤ 64 px. At 33–64 px the small stem keeps the
    max-pool: layer1 then runs at half the input size (a 64 px image costs ~0.56 GFLOP forward;
    without the pool it would be ~2.2 GFLOP, too slow to train on CPUs).
    """
    if stem not in ("auto", "small", "imagenet"):
        raise DNTKError(f"unknown stem {stem!r}; use 'auto', 'small' or 'imagenet'")
    small = stem == "small" or (stem == "auto" and image_size <= 64)
    model = torchvision.models.resnet18(num_classes=num_classes)
    if small:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        if image_size <= 32:
            model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return model


def build_model(name: str, num_classes: int, in_channels: int = 3, image_size: int = 224, stem: str = "auto") -> nn.Module:
    if name == "resnet18":
        return resnet18(num_classes, in_channels, image_size, stem)
    if name == "small_cnn":
        return SmallCNN(in_channels, num_classes)
    raise DNTKError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")


def forward_with_penultimate(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward: (output, penultimate-layer features [B, d] — the input of the final Linear)."""
    head = _final_linear(model)
    box = {}
    h = head.register_forward_hook(lambda m, i, o: box.__setitem__("f", i[0]))
    try:
        out = model(x)
    finally:
        h.remove()
    return out, box["f"].flatten(1)


def penultimate(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Penultimate-layer features [B, d] (the input of the final Linear)."""
    return forward_with_penultimate(model, x)[1]


def _final_linear(model):
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    if last is None:
        raise DNTKError("the model has no Linear layer, so it has no penultimate features")
    return last


# --- checkpoints ------------------------------------------------------------------------------------
_PREFIXES = ("module.", "model.", "_orig_mod.", "net.")


def _unwrap(obj):
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "net", "teacher"):
            if key in obj and isinstance(obj[key], (dict, nn.Module)):
                return _unwrap(obj[key])
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
    raise DNTKError("the checkpoint holds no state dict (looked for a tensor dict, or keys 'state_dict', 'model', "
                    "'model_state_dict'); save it with torch.save(model.state_dict(), path)")


def normalize_state_dict(state: dict) -> dict:
    """Strip DataParallel/compile prefixes and map WMDD-style ``downsample.conv/norm`` keys to
    torchvision's ``downsample.0/1``."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        key = re.sub(r"downsample\.conv\.", "downsample.0.", key)
        key = re.sub(r"downsample\.(norm|bn)\.", "downsample.1.", key)
        out[key] = value
    return out


def load_checkpoint(model: nn.Module, source) -> nn.Module:
    """Load a checkpoint (path, state dict, module, or a dict wrapping one) into ``model``.

    Accepts torchvision state dicts, ``module.``/``model.`` prefixes and WMDD-style
    ``downsample.conv/norm`` keys. Anything else that does not match raises a DNTKError listing
    missing keys, unexpected keys and shape mismatches.
    """
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise DNTKError(f"checkpoint {path} does not exist")
        try:
            source = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:  # pickle/zip errors have many types
            raise DNTKError(f"cannot read checkpoint {path}: {e}") from None
    state = normalize_state_dict(_unwrap(source))
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        head = _final_linear(model)
        head_key = next((k for k, v in model.named_parameters() if v is head.weight), None)
        if missing and (len(missing) > len(own) // 4 or unexpected):
            hint = " It is probably for another architecture (check --model and --image-size)."
        elif head_key in state and state[head_key].shape[0] != own[head_key].shape[0]:
            hint = (f" The classifier head differs: the checkpoint has {state[head_key].shape[0]} classes, the data "
                    f"{own[head_key].shape[0]}.")
        else:
            hint = ""
        raise DNTKError("checkpoint does not match the model." + hint +
                        f"\n  missing keys ({len(missing)}): {_short(missing)}"
                        f"\n  unexpected keys ({len(unexpected)}): {_short(unexpected)}"
                        f"\n  shape mismatches ({len(shapes)}): {_short(shapes)}")
    model.load_state_dict(state)
    return model


def _short(items, n=6):
    return ", ".join(items[:n]) + (f", … (+{len(items) - n})" if len(items) > n else "") if items else "none"

