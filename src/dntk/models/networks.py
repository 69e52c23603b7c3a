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


def forward_with_penultimate(model: nn.Module, x) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward: (logits, penultimate-layer features [B, d] — the input of the final Linear). x: a
    sample batch of :mod:`dntk.samples` (tensor, tuple or dict of tensors)."""
    from .. import samples

    head = _final_linear(model)
    box = {}
    h = head.register_forward_hook(lambda m, i, o: box.__setitem__("f", i[0]))
    try:
        out = samples.call(model, x)
    finally:
        h.remove()
    return out, box["f"].flatten(1)


def penultimate(model: nn.Module, x) -> torch.Tensor:
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
_WRAPPERS = ("state_dict", "model_state_dict", "model", "net", "teacher", "module")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.pt", "best.pt")


def _unwrap(obj):
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        for key in _WRAPPERS:
            if key in obj and isinstance(obj[key], (dict, nn.Module)):
                return _unwrap(obj[key])
    raise DNTKError("the checkpoint holds no state dict (looked for a tensor dict, or keys "
                    f"{', '.join(repr(k) for k in _WRAPPERS)}); save it with torch.save(model.state_dict(), path)")


def _strip_shared(state: dict) -> list[dict]:
    """The state with one, two, ... leading ``module.`` / ``model.`` / ``_orig_mod.`` / ``net.`` removed while
    every key shares it — each level a candidate (DataParallel around a model whose own keys start with
    ``model.`` needs exactly one level)."""
    levels = []
    while state:
        p = next((p for p in _PREFIXES if all(k.startswith(p) for k in state)), None)
        if p is None:
            break
        state = {k[len(p):]: v for k, v in state.items()}
        levels.append(state)
    return levels


def _strip(state: dict) -> dict | None:
    """Remove those prefixes from every key that has them; None when two keys would become one."""
    out = {}
    for key, value in state.items():
        changed = True
        while changed:
            changed = False
            for p in _PREFIXES:
                if key.startswith(p):
                    key, changed = key[len(p):], True
        if key in out:
            return None
        out[key] = value
    return out


def _wmdd_keys(state: dict) -> dict:
    """WMDD-style ``downsample.conv/norm`` keys mapped to torchvision's ``downsample.0/1``."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"downsample\.conv\.", "downsample.0.", key)
        key = re.sub(r"downsample\.(norm|bn)\.", "downsample.1.", key)
        out[key] = value
    return out


def normalize_state_dict(state: dict) -> dict:
    """Strip DataParallel/compile prefixes and map WMDD-style ``downsample.conv/norm`` keys to
    torchvision's ``downsample.0/1``."""
    return _wmdd_keys(_strip(state) or (_strip_shared(state) or [state])[-1])


def read_state_dict(path) -> dict:
    """The state dict in a file or folder people save: a ``torch.save`` of a state dict (read with
    ``weights_only=True``), the same wrapped as ``{"state_dict": ...}`` / ``{"model": ...}`` (Lightning and
    common training scripts), a ``.safetensors`` file, or a folder written by ``save_pretrained``
    (``model.safetensors`` or ``pytorch_model.bin`` inside). A pickle holding Python objects beyond tensors
    (e.g. a whole module) is read with ``weights_only=False`` only as a fallback — it is your own file."""
    path = Path(path)
    if not path.exists():
        raise DNTKError(f"checkpoint {path} does not exist")
    if path.is_dir():
        found = [path / f for f in _WEIGHT_FILES if (path / f).exists()] or sorted(path.glob("*.safetensors"))
        if not found:
            raise DNTKError(f"checkpoint folder {path} has no weights file ({', '.join(_WEIGHT_FILES)} or *.safetensors)")
        path = found[0]
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise DNTKError("reading .safetensors needs the optional package 'safetensors'; pip install \"dntk[hf]\"") from None
        try:
            return load_file(str(path))
        except Exception as e:
            raise DNTKError(f"cannot read checkpoint {path}: {e}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as first:  # pickle/zip errors have many types
        try:
            obj = torch.load(path, map_location="cpu", weights_only=False)
        except Exception:
            raise DNTKError(f"cannot read checkpoint {path}: {first}") from None
    return _unwrap(obj)


def _mismatch(own: dict, state: dict) -> tuple[list, list, list]:
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    return missing, unexpected, shapes


def load_checkpoint(model: nn.Module, source) -> nn.Module:
    """Load a checkpoint (path, folder, state dict, module, or a dict wrapping one) into ``model``.

    The keys are used as they are when they match; otherwise with the ``module.`` / ``model.`` /
    ``_orig_mod.`` prefixes stripped (DataParallel, Lightning, torch.compile) — first only prefixes every
    key shares, then from every key that has one, never merging two keys — and WMDD-style
    ``downsample.conv/norm`` keys mapped to torchvision's: whichever of these makes every key match.
    Anything else raises a DNTKError listing missing keys, unexpected keys and shape mismatches.
    """
    if isinstance(source, (str, Path)):
        state = read_state_dict(source)
    else:
        state = _unwrap(source)
    own = model.state_dict()
    each = _strip(state)
    plain = [state] + _strip_shared(state) + ([each] if each is not None else [])
    candidates = plain + [_wmdd_keys(c) for c in plain]
    for cand in candidates:
        if not any(_mismatch(own, cand)):
            model.load_state_dict(cand)
            return model
    best = min(candidates, key=lambda c: len(_mismatch(own, c)[0]) + len(_mismatch(own, c)[1]) + len(_mismatch(own, c)[2]))
    missing, unexpected, shapes = _mismatch(own, best)
    head = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            head = m
    head_key = next((k for k, v in model.named_parameters() if head is not None and v is head.weight), None)
    if head_key in best and best[head_key].shape[0] != own[head_key].shape[0]:
        hint = (f" The classifier head differs: the checkpoint has {best[head_key].shape[0]} classes, the data "
                f"{own[head_key].shape[0]}.")
    elif missing and (len(missing) > len(own) // 4 or unexpected):
        hint = " It is probably for another architecture (check --model and --image-size)."
    else:
        hint = ""
    raise DNTKError("checkpoint does not match the model." + hint +
                    f"\n  missing keys ({len(missing)}): {_short(missing)}"
                    f"\n  unexpected keys ({len(unexpected)}): {_short(unexpected)}"
                    f"\n  shape mismatches ({len(shapes)}): {_short(shapes)}")


def _short(items, n=6):
    return ", ".join(items[:n]) + (f", … (+{len(items) - n})" if len(items) > n else "") if items else "none"
