"""``--model``: any classifier by name — the built-ins, torchvision, timm, Hugging Face folders, or a
factory of the user's own.

=================================  ============================================================================
``resnet18``, ``small_cnn``        the built-ins (:mod:`dntk.models.networks`)
``torchvision:NAME``               ``torchvision.models.get_model(NAME, num_classes=C)`` (classification builders)
``timm:NAME``                      ``timm.create_model(NAME, num_classes=C, in_chans=c)`` (extra ``dntk[timm]``)
``hf:DIR``                         ``AutoModelFor{Sequence,Image}Classification.from_pretrained(DIR)`` from a
                                   local ``save_pretrained`` folder, offline; logits are the output's ``.logits``
                                   (extra ``dntk[hf]``)
``package.module:callable``        a factory called with ``num_classes=C`` — and ``in_channels`` /
``path/to/file.py:callable``       ``image_size`` only if it names them — returning an ``nn.Module``
=================================  ============================================================================

``pretrained=True`` loads the library's own pretrained weights (torchvision's weights enum, timm's
pretrained tag) from the local cache only — never a download, never a hang — and otherwise fails with
the cache path and how to fill it. The classifier head then has C outputs and a fresh initialisation
(the pretrained head's rows are the pretrained classes).
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from ..errors import DNTKError

BUILTIN = ("resnet18", "small_cnn")
PREFIXES = ("torchvision", "timm", "hf")
EXTRAS = {"timm": ("timm", "timm"), "hf": ("transformers", "hf")}


@dataclass(frozen=True)
class ModelSpec:
    """A parsed ``--model``: kind (builtin, torchvision, timm, hf, factory) and its target (a builder
    name, a folder, or ``module:callable``)."""

    kind: str
    target: str
    text: str

    @property
    def carries_weights(self) -> bool:
        """An ``hf:`` folder holds trained weights: it is the teacher as it is (unless training is asked for)."""
        return self.kind == "hf"


def parse_model(text: str) -> ModelSpec:
    """Check the form of a ``--model`` value (nothing is imported or built)."""
    if not isinstance(text, str) or not text.strip():
        raise DNTKError("--model must be a non-empty string: resnet18, small_cnn, torchvision:NAME, timm:NAME, hf:DIR, "
                        "package.module:callable or path/to/file.py:callable")
    text = text.strip()
    if text in BUILTIN:
        return ModelSpec("builtin", text, text)
    head, sep, tail = text.partition(":")
    if sep and head in PREFIXES:
        if not tail:
            raise DNTKError(f"--model {text!r}: name the {'folder' if head == 'hf' else 'model'} after '{head}:', e.g. "
                            + {"torchvision": "torchvision:mobilenet_v3_small", "timm": "timm:convnext_atto",
                               "hf": "hf:./my-finetuned-bert"}[head])
        return ModelSpec(head, tail, text)
    if sep:
        module, _, attr = text.rpartition(":")
        if not module or not attr or not attr.replace(".", "_").isidentifier():
            raise DNTKError(f"--model {text!r}: a factory is package.module:callable or path/to/file.py:callable")
        return ModelSpec("factory", text, text)
    close = difflib.get_close_matches(text, BUILTIN, n=1)
    raise DNTKError(f"unknown model {text!r}" + (f" (did you mean {close[0]!r}?)" if close else "") +
                    f"; use {', '.join(BUILTIN)}, torchvision:NAME, timm:NAME, hf:DIR, package.module:callable or "
                    "path/to/file.py:callable")


def require_extra(module: str, extra: str):
    """Import an optional dependency, or fail naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise DNTKError(f"this needs the optional package {module!r}, which is not installed; "
                        f"pip install \"dntk[{extra}]\"") from None


def build_model_spec(spec: ModelSpec | str, num_classes: int, *, in_channels: int | None = 3, image_size: int = 224,
                     stem: str = "auto", pretrained: bool = False, fresh: bool = False,
                     allow_new: bool = False) -> nn.Module:
    """A classifier with ``num_classes`` outputs for ``--model`` spec.

    in_channels: the image channels (None for data that is not images: token ids, tuples, ...).
    fresh: for ``hf:`` a new random initialisation of the folder's architecture (a student) instead
    of its weights. allow_new: for ``hf:``, accept a folder that lacks some weights (e.g. the
    classification head of a pretrained encoder) — they are initialised at random, for a model that is
    trained next; otherwise that is an error."""
    spec = parse_model(spec) if isinstance(spec, str) else spec
    if pretrained and spec.kind not in ("torchvision", "timm"):
        raise DNTKError(f"--pretrained loads torchvision's or timm's own weights; --model {spec.text} has none "
                        "(give trained weights with --checkpoint instead)")
    if spec.kind == "builtin":
        from .networks import build_model

        if in_channels is None:
            raise DNTKError(f"--model {spec.text} is an image classifier; this data is not images — use a model that "
                            "takes these inputs (hf:DIR, or a factory of your own)")
        return build_model(spec.target, num_classes, in_channels, image_size, stem)
    if spec.kind == "torchvision":
        return _torchvision(spec.target, num_classes, in_channels, pretrained)
    if spec.kind == "timm":
        return _timm(spec.target, num_classes, in_channels, pretrained)
    if spec.kind == "hf":
        return _hf(spec.target, num_classes, fresh, allow_new)
    return _factory(spec.target, num_classes, in_channels, image_size)


# --- torchvision --------------------------------------------------------------------------------------
def _torchvision(name, C, in_channels, pretrained):
    import torchvision.models as tvm

    names = tvm.list_models(module=tvm)   # the classification builders (not detection, segmentation, video)
    if name not in names:
        close = difflib.get_close_matches(name, names, n=3)
        raise DNTKError(f"torchvision has no classification model {name!r}"
                        + (f" (close: {', '.join(close)})" if close else "") +
                        "; list them with torchvision.models.list_models(module=torchvision.models)")
    if in_channels != 3:
        raise DNTKError(f"torchvision:{name} takes 3-channel images; this data has "
                        f"{'no image channels' if in_channels is None else in_channels}. Use RGB images, or a factory "
                        "of your own that adapts the stem")
    model = tvm.get_model(name, weights=None, num_classes=C)
    if pretrained:
        weights = tvm.get_model_weights(name).DEFAULT
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
        if not path.exists():
            raise DNTKError(
                f"--pretrained: torchvision's weights {weights} are not in the local cache ({path}); dntk never "
                f"downloads. On a machine with internet run  python -c \"import torchvision; "
                f"torchvision.models.get_model('{name}', weights='DEFAULT')\"  and copy {path.name} to {path.parent} "
                "(or set TORCH_HOME to a folder holding hub/checkpoints/)")
        state = torch.load(path, map_location="cpu", weights_only=True)
        load_pretrained_backbone(model, state, len(weights.meta.get("categories") or []))
    return model


def load_pretrained_backbone(model: nn.Module, state: dict, pretrained_classes: int) -> None:
    """Load every pretrained tensor; the classifier head's (rows = the pretrained classes where the model
    has C) keep the model's fresh initialisation. Any other mismatch is an error."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    head = [k for k in own if k in state and own[k].shape != state[k].shape]
    bad = [k for k in head if state[k].shape[0] != pretrained_classes or state[k].shape[1:] != own[k].shape[1:]]
    if missing or unexpected or bad:
        raise DNTKError(f"the pretrained weights do not fit the model: missing {missing[:5]}, unexpected "
                        f"{unexpected[:5]}, shapes {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in bad[:5]]}")
    model.load_state_dict({k: (own[k] if k in head else v) for k, v in state.items()})


# --- timm ----------------------------------------------------------------------------------------------
def _timm(name, C, in_channels, pretrained):
    timm = require_extra(*EXTRAS["timm"])
    if not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:5] or difflib.get_close_matches(name, timm.list_models(), n=3)
        raise DNTKError(f"timm has no model {name!r}" + (f" (close: {', '.join(close)})" if close else "") +
                        "; list them with timm.list_models()")
    if in_channels is None:
        raise DNTKError(f"timm:{name} is an image model; this data is not images")
    if not pretrained:
        return timm.create_model(name, pretrained=False, num_classes=C, in_chans=in_channels)
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise DNTKError(f"timm:{name} has no pretrained weights; drop --pretrained")
    path = _timm_cached_file(cfg)
    if path is None:
        where = [str(p) for p in _timm_cache_candidates(cfg)]
        raise DNTKError(
            f"--pretrained: timm's weights for {name} are not in the local cache (looked in {', '.join(where) or '-'}); "
            f"dntk never downloads. On a machine with internet run  python -c \"import timm; timm.create_model('{name}', "
            "pretrained=True)\"  and copy the Hugging Face cache (HF_HUB_CACHE, default ~/.cache/huggingface/hub) "
            "or torch's hub/checkpoints folder here")
    return timm.create_model(name, pretrained=True, num_classes=C, in_chans=in_channels,
                             pretrained_cfg_overlay={"file": str(path), "source": ""})


def _hf_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface"))
    return home / "hub"


def _timm_cache_candidates(cfg) -> list[Path]:
    """Where timm's weights for a pretrained cfg may lie locally (glob patterns: any HF snapshot)."""
    out = []
    hub_id = getattr(cfg, "hf_hub_id", None)
    if hub_id:
        repo = _hf_cache_dir() / ("models--" + hub_id.replace("/", "--"))
        out += [repo / "snapshots" / "*" / f for f in ("model.safetensors", "pytorch_model.bin")]
    if getattr(cfg, "file", None):
        out.append(Path(cfg.file))
    if getattr(cfg, "url", None):
        out.append(Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg.url))
    return out


def _timm_cached_file(cfg) -> Path | None:
    for pattern in _timm_cache_candidates(cfg):
        found = sorted(Path(pattern.anchor).glob(str(pattern.relative_to(pattern.anchor))))
        if found:
            return found[-1]
    return None


# --- Hugging Face folders ------------------------------------------------------------------------------
def hf_config(folder):
    """The ``config.json`` of a save_pretrained folder (transformers.AutoConfig), offline."""
    transformers = require_extra(*EXTRAS["hf"])
    folder = Path(folder)
    if not (folder / "config.json").exists():
        raise DNTKError(f"hf:{folder}: no config.json there; point at a folder written by model.save_pretrained(DIR)")
    return transformers.AutoConfig.from_pretrained(str(folder), local_files_only=True)


def pad_token_id(model=None, spec: str | None = None) -> int:
    """The pad token to pad ragged token ids with: ``model.config.pad_token_id`` of a (Hugging Face) model
    object, else that of the ``hf:`` folder ``spec`` names, else 0."""
    config = getattr(model, "config", None)
    if config is None and spec and spec.startswith("hf:"):
        config = hf_config(spec[3:])
    pad = getattr(config, "pad_token_id", None) if config is not None else None
    return int(pad) if pad is not None else 0


def _hf_auto_class(config):
    import transformers

    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith("ForImageClassification") for a in archs):
        return transformers.AutoModelForImageClassification
    return transformers.AutoModelForSequenceClassification


def _hf(folder, C, fresh, allow_new=False):
    config = hf_config(folder)
    if config.num_labels != C:
        raise DNTKError(f"hf:{folder} classifies {config.num_labels} labels but the data has {C} classes; fine-tune "
                        "a model with num_labels equal to the data's classes, or check --data-root")
    auto = _hf_auto_class(config)
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()   # a bar per load of a local folder is noise
    try:
        if fresh:   # seeded by the caller
            return auto.from_config(config)
        model, info = auto.from_pretrained(str(folder), local_files_only=True, output_loading_info=True)
        missing = list(info.get("missing_keys") or [])
        if missing and not allow_new:
            raise DNTKError(f"hf:{folder} lacks weights for {', '.join(sorted(missing)[:6])}"
                            f"{' …' if len(missing) > 6 else ''}: {auto.__name__} would initialise them at random "
                            "(a folder saved from a model without this classification head?). Save the fine-tuned "
                            "classifier, or train it here with --train-teacher always")
        return model
    except (OSError, ValueError) as e:
        raise DNTKError(f"hf:{folder}: cannot build {auto.__name__} from it ({e})") from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()


# --- user factories ------------------------------------------------------------------------------------
def load_callable(target: str):
    """``package.module:callable`` or ``path/to/file.py:callable`` (attribute paths allowed: ``m:Class.build``)."""
    module_text, _, attr = target.rpartition(":")
    if module_text.endswith(".py") or os.sep in module_text or "/" in module_text:
        path = Path(module_text).expanduser().resolve()
        if not path.is_file():
            raise DNTKError(f"--model {target}: no file {path}")
        name = f"dntk_user_model_{abs(hash(str(path)))}"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise DNTKError(f"--model {target}: importing {path} failed ({type(e).__name__}: {e})") from e
    else:
        try:
            module = importlib.import_module(module_text)
        except ImportError as e:
            raise DNTKError(f"--model {target}: cannot import {module_text!r} ({e}); is it installed or on PYTHONPATH? "
                            "A file is written path/to/file.py:callable") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise DNTKError(f"--model {target}: {module_text} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise DNTKError(f"--model {target}: {attr} is not callable")
    return obj


def call_factory(fn, num_classes: int, in_channels=None, image_size=None, what: str = "the factory") -> nn.Module:
    """``fn(num_classes=C, [in_channels=c], [image_size=s])`` — the optional ones only where ``fn`` names
    them; the result must be an nn.Module."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    named = {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_kwargs = any(p.kind == p.VAR_KEYWORD for p in params.values())
    if params and "num_classes" not in named and not takes_kwargs:
        raise DNTKError(f"{what} {getattr(fn, '__name__', fn)}{inspect.signature(fn)} does not accept num_classes; "
                        "dntk calls it as f(num_classes=C) so the head matches the data")
    kwargs = {"num_classes": num_classes}
    if "in_channels" in named and in_channels is not None:
        kwargs["in_channels"] = in_channels
    if "image_size" in named and image_size is not None:
        kwargs["image_size"] = image_size
    model = fn(**kwargs)
    if not isinstance(model, nn.Module):
        raise DNTKError(f"{what} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _factory(target, C, in_channels, image_size):
    return call_factory(load_callable(target), C, in_channels, image_size, what=f"--model {target}")
