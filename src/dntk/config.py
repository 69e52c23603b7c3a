"""Settings, one dataclass per stage; the command-line flags are generated from them.

Each field is declared once with :func:`option` — its default, help text, range or choices, and
its flag name — so a setting has one name and one default in Python and on every CLI verb
(``results.json``'s ``config`` holds the same values by section, under the field names). Out-of-range values are refused (never replaced by a default) both by argparse
and by :meth:`RunConfig.resolved` for Python callers. ``None`` means "the default for this
dataset" where the field says so (``none_means``).

    RunConfig(data=DataConfig(...), teacher=TeacherConfig(...), features=..., distill=...,
              kernel=..., gradients=..., device, seed, out, progress)
    RunConfig.from_options(m=200, distill="wmdd", ...)   # flat names = the flags' names
"""

from __future__ import annotations

import argparse
import copy
import math
import os
from dataclasses import MISSING, asdict, dataclass, field, fields

import torch

from .data.sources import DATASETS
from .distill.methods import DISTILLERS
from .errors import DNTKError, is_int_at_least
from .gradient_distillation.evaluation import GRADIENT_METHODS, NEEDS_BUDGET
from .gradient_distillation.local_global import MODES
from .projection.registry import DEFAULT as DEFAULT_PROJECTOR
from .projection.registry import NAMES as PROJECTORS

_KINDS = ("str", "int", "float", "bool", "ints")


def option(default, help: str, *, kind: str = "str", flag: str | None = None, minimum=None, maximum=None,
           above: bool = False, choices=None, none_means: str | None = None, aliases=(), inverse: str | None = None,
           cli: bool = True, check=None):
    """A config field with its command-line description.

    kind: str / int / float / bool / ints (comma-separated integers); minimum (≥, or > with
    ``above``) and maximum (≤) bound numbers; choices restrict strings; none_means documents what
    None stands for (None is then allowed); flag overrides ``--field-name``; aliases are older
    spellings still accepted; inverse names a store_false flag for a bool that defaults to True;
    cli=False keeps a field Python-only; check: a function that raises a DNTKError naming what is wrong
    with a (non-None) string value (the form of ``--model``)."""
    assert kind in _KINDS, kind
    meta = {"help": help, "kind": kind, "flag": flag, "minimum": minimum, "maximum": maximum, "above": above,
            "choices": tuple(choices) if choices is not None else None, "none_means": none_means,
            "aliases": tuple(aliases), "inverse": inverse, "cli": cli,
            "check": check}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


def _flag(f) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def option_name(f) -> str:
    """The flat name of a field: its flag without dashes (``--gradient-distill`` → gradient_distill)."""
    return _flag(f)[2:].replace("-", "_")


def _range_text(meta) -> str:
    kind = meta["kind"]
    if kind == "int":
        text = f"an integer ≥ {meta['minimum']}"
    elif kind == "float":
        parts = []
        if meta["minimum"] is not None:
            parts.append(f"{'>' if meta['above'] else '≥'} {meta['minimum']:g}")
        if meta["maximum"] is not None:
            parts.append(f"≤ {meta['maximum']:g}")
        text = "a finite number " + " and ".join(parts) if parts else "a finite number"
    elif kind == "ints":
        text = "comma-separated integers ≥ 1"
    elif kind == "bool":
        text = "True or False"
    else:
        text = ("one of " + ", ".join(meta["choices"])) if meta["choices"] else "a non-empty string"
    return text


def check_value(f, value, prefix: str = "") -> None:
    """Raise a DNTKError naming the flag when ``value`` is outside field ``f``'s range."""
    meta = f.metadata
    if value is None and meta.get("none_means") is not None:
        return
    name = prefix + _flag(f)
    kind = meta["kind"]
    ok = True
    if kind == "int":
        ok = is_int_at_least(value, meta["minimum"] if meta["minimum"] is not None else -math.inf)
    elif kind == "float":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok and meta["minimum"] is not None:
            ok = value > meta["minimum"] if meta["above"] else value >= meta["minimum"]
        if ok and meta["maximum"] is not None:
            ok = value <= meta["maximum"]
    elif kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "ints":
        ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(is_int_at_least(v, 1) for v in value)
    elif meta["choices"]:
        ok = value in meta["choices"]
    else:
        ok = isinstance(value, str) and value != ""
        if ok and meta.get("check") is not None:
            meta["check"](value)
    if not ok:
        unset = f", or leave it unset for the default ({meta['none_means']})" if meta.get("none_means") else ""
        problem = "is not a valid choice" if meta["choices"] else "is out of range"
        raise DNTKError(f"{name} {value!r} {problem}: it must be {_range_text(meta)}{unset}")


def _check_model(text: str) -> None:
    from .models.registry import parse_model

    parse_model(text)


# --- the stages' settings ------------------------------------------------------------------------------
@dataclass
class DataConfig:
    """Where the images come from and how they are prepared."""

    dataset: str = option("digits", "digits is embedded; folder is any ImageFolder tree; hf-disk a tokenized "
                          "datasets.DatasetDict saved with save_to_disk (train and test/validation splits)",
                          choices=DATASETS)
    data_root: str | None = option(None, "ImageFolder root with train/ and val/ (folder, imagenette), or the "
                                   "save_to_disk folder (hf-disk)", none_means="none: digits needs no folder")
    download: bool = option(False, "imagenette: download with torchvision if --data-root lacks it", kind="bool")
    image_size: int | None = option(None, "side length after resize + centre crop", kind="int", minimum=1,
                                    none_means="64; digits 8")
    resize: int | None = option(None, "ImageFolder data: shorter side before the centre crop (the paper's 160 px "
                                "setting: 176)", kind="int", minimum=1, none_means="--image-size: no margin")
    n_test: int | None = option(None, "test points, even across classes", kind="int", minimum=1,
                                none_means="the whole test split")
    max_length: int | None = option(None, "hf-disk: cut or pad every sequence to this many tokens",
                                    kind="int", minimum=1, none_means="pad each batch to its longest sequence")
    cache_data: bool = option(True, "keep decoded images in OUT/cache", kind="bool", cli=False)


@dataclass
class TeacherConfig:
    """The network analysed: its architecture, where its weights come from, how it is trained."""

    model: str | None = option(None, "the classifier: resnet18, small_cnn, torchvision:NAME, timm:NAME, hf:DIR "
                               "(a save_pretrained folder), package.module:callable or path/to/file.py:callable "
                               "(called with num_classes=C)", none_means="small_cnn for digits, resnet18 otherwise",
                               check=_check_model)
    checkpoint: str | None = option(None, "teacher weights: a state_dict file (also wrapped as {'state_dict': ...} / "
                                    "{'model': ...}, module./model. prefixes), .safetensors, or a save_pretrained "
                                    "folder", none_means="train one, cached in OUT/teacher")
    pretrained: bool = option(False, "start from torchvision's / timm's own pretrained weights (local cache only; "
                              "the head gets C outputs)", kind="bool")
    train_teacher: str = option("auto", "auto: train the teacher unless weights are given (--checkpoint, an hf: "
                                "folder, a model object); always: train (fine-tune) it from those weights; never: "
                                "use the model as built", choices=("auto", "always", "never"))
    stem: str = option("auto", "ResNet-18 stem: small (3x3/1) for inputs ≤ 64 px under auto",
                       choices=("auto", "small", "imagenet"))
    epochs: int | None = option(None, "teacher epochs", kind="int", minimum=1, none_means="30 for digits, 15 otherwise")
    optimizer: str = option("sgd", "teacher optimizer", choices=("sgd", "adamw"))
    lr: float | None = option(None, "teacher learning rate", kind="float", minimum=0.0, above=True,
                              none_means="0.05 for sgd, 2e-3 for adamw")
    train_batch_size: int = option(128, "teacher training batch size", kind="int", minimum=1)
    train_pipeline: str = option("auto", "how teacher and student batches are made: classic (per-image augmentation "
                                 "on the CPU), device (images kept on the device, batched augmentation there, no host "
                                 "syncs in the step loop, bf16 on CUDA); auto: device on CUDA, classic on the CPU",
                                 choices=("auto", "classic", "device"))
    val_fraction: float = option(0.1, "share of each class of the training data held out (seeded) to choose the "
                                 "teacher's best epoch — never the test split; 0: keep the last epoch, no selection",
                                 kind="float", minimum=0.0, maximum=0.5)
    base_model: str = option("teacher", "the network whose NTK is analysed: the teacher, or a student trained on the "
                             "distilled set with the teacher's soft labels", choices=("teacher", "student"))
    student_epochs: int = option(60, "epochs of the --base-model student", kind="int", minimum=1)
    student_protocol: str = option("dntk", "how the --base-model student is trained: dntk (AdamW, one-cycle, T = 4) or "
                                   "wmdd (WMDD's own: RandomResizedCrop + CutMix, cosine, T = 20)",
                                   choices=("dntk", "wmdd"))


@dataclass
class FeatureConfig:
    """Projected per-sample, per-logit gradients."""

    projector: str = option(DEFAULT_PROJECTOR, "random projection of the gradients", choices=PROJECTORS)
    k: int | None = option(None, "projection dimension", kind="int", minimum=1, none_means="min(4096, P/2)")
    batch_size: int = option(32, "samples per feature pass", kind="int", minimum=1)
    feature_chunk: int = option(1024, "samples per feature-store shard (the unit of resume and of work per process)",
                                kind="int", minimum=1)
    exact: bool = option(False, "also compute the exact per-class eNTK and compare", kind="bool")
    test_features: str = option("store", "store the test features (needed by --gradient-distill), or stream them: "
                                "predictions computed shard by shard, memory flat in the number of test images",
                                choices=("store", "stream"))

    def resolved_k(self, model: torch.nn.Module) -> int:
        """The projection dimension for ``model``: --k, or by default min(4096, P/2) for P trainable parameters."""
        if self.k is not None:
            return self.k
        return min(4096, sum(p.numel() for p in model.parameters() if p.requires_grad) // 2)


@dataclass
class DistillConfig:
    """Stage 1: which images the kernel model is built on."""

    method: str = option("none", "stage 1: none (a random balanced real subset of --m), random, kcenter, wmdd, "
                         "kernel-greedy (real images chosen from a pool by the kernel model's error), kernel-herding "
                         "(by its posterior variance)",
                         flag="--distill", choices=("none",) + DISTILLERS, aliases=("--method",))
    ipc: int = option(10, "images per class for --distill", kind="int", minimum=1)
    load: str | None = option(None, "use a distilled-set folder made by `dntk distill`", flag="--distilled",
                              none_means="distil with --distill")
    evaluate: bool = option(False, "dntk distill: then train a student on the distilled set under WMDD's own protocol "
                            "(teacher relabelling every batch, RandomResizedCrop + CutMix, AdamW, cosine, T = 20) and "
                            "report its test accuracy", kind="bool")
    evaluate_epochs: int = option(300, "epochs of the --evaluate student (WMDD's: 300)", kind="int", minimum=1)
    pool_factor: int = option(4, "kernel-greedy / kernel-herding: candidates per class = pool_factor × ipc random "
                              "real images, whose Jacobians are the method's cost", kind="int", minimum=1)
    wmdd_iterations: int = option(200, "WMDD optimisation steps per class (WMDD's own: 2000)", kind="int", minimum=0,
                                  aliases=("--iterations",))
    wmdd_lr: float = option(0.05, "WMDD learning rate (WMDD's own: 0.25)", kind="float", minimum=0.0, above=True)
    wmdd_bn_weight: float = option(1.0, "WMDD BatchNorm-statistics loss weight (WMDD's own: 3.0)", kind="float",
                                   minimum=0.0, aliases=("--bn-weight",))
    wmdd_ce_weight: float = option(1.0, "WMDD cross-entropy loss weight", kind="float", minimum=0.0,
                                   aliases=("--ce-weight",))
    wmdd_feature_weight: float = option(1.0, "WMDD Wasserstein-barycenter feature loss weight", kind="float",
                                        minimum=0.0, aliases=("--feature-weight",))
    wmdd_precision: str = option("float32", "WMDD steps in float32 or under bf16 autocast (a GPU option; its effect on "
                                 "the distilled sets is not measured yet)", choices=("float32", "bf16"))
    wmdd_classes_per_step: int = option(1, "WMDD classes optimised in one batch (same objective; use C on a GPU)",
                                        kind="int", minimum=1, aliases=("--classes-per-step",))

    def wmdd_options(self) -> dict:
        """Keyword arguments of :class:`dntk.distill.WMDDConfig` (besides ipc and seed)."""
        return {"iterations": self.wmdd_iterations, "lr": self.wmdd_lr, "bn_weight": self.wmdd_bn_weight,
                "ce_weight": self.wmdd_ce_weight, "feature_weight": self.wmdd_feature_weight,
                "classes_per_step": self.wmdd_classes_per_step, "precision": self.wmdd_precision}


@dataclass
class KernelConfig:
    """The per-class kernel model (trace-normalised KRR)."""

    m: int | None = option(None, "training points, even across classes (a distilled set sets m itself); "
                           "--train-points is the same setting, for torchrun, whose own parser claims --m",
                           kind="int", minimum=1, none_means="500", aliases=("--train-points",))
    ridge: float = option(1e-4, "ridge, relative to the mean kernel diagonal", kind="float", minimum=0.0)
    targets: str = option("logits", "regress the teacher's logits or one-hot labels", choices=("logits", "onehot"))
    m_grid: list[int] | None = option(None, "m values for figure1", kind="ints", none_means="a log grid up to m")


@dataclass
class GradientConfig:
    """Stage 3: gradient distillation of the per-class kernels."""

    method: str = option("none", "none, local-global (Algorithm 1), random, fps, kmeans, leverage (selection "
                         "baselines), target-direction (reproduces the all-m regression at s = 1), hybrid (target "
                         "direction + Algorithm 1), eigen (top-s eigenvectors of each class kernel: the Eckart–Young "
                         "optimum on the training points), hybrid-eigen (target direction + top s − 1 eigenvectors)",
                         flag="--gradient-distill", choices=("none",) + GRADIENT_METHODS)
    budget: int | None = option(None, "exactly s gradients per class kernel (m/s = compression)", kind="int",
                                minimum=1, none_means="none: Algorithm 1 picks s from the thresholds")
    tau_v: float = option(0.95, "explained variance for truncation ranks (Algorithm 1)", kind="float", minimum=0.0,
                          above=True, maximum=1.0)
    tau_g: float = option(0.9, "coverage below which a global direction is a gap", kind="float", minimum=0.0,
                          above=True, maximum=1.0)
    clusters: int = option(10, "clusters H per class kernel (Algorithm 1)", kind="int", minimum=1)
    mode: str = option("per_class", "Algorithm 1 per class kernel or on the class-averaged kernel", flag="--gd-mode",
                       choices=MODES)
    curve_seeds: int = option(1, "seeds 0..N−1 of Figure 3's budget curves (every method at every s; the seeded "
                              "baselines' spread — Algorithm 1 and the spectral methods are deterministic)",
                              kind="int", minimum=1)


SECTIONS = {"data": DataConfig, "teacher": TeacherConfig, "features": FeatureConfig, "distill": DistillConfig,
            "kernel": KernelConfig, "gradients": GradientConfig}


@dataclass
class RunConfig:
    """Everything ``dntk run`` does, by stage. ``resolved()`` checks every value and fills the
    dataset-dependent defaults."""

    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    features: FeatureConfig = field(default_factory=FeatureConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    kernel: KernelConfig = field(default_factory=KernelConfig)
    gradients: GradientConfig = field(default_factory=GradientConfig)
    device: str = option("cpu", "cpu, cuda, cuda:1, ...")
    threads: int | None = option(None, "CPU threads torch uses (torch.set_num_threads); teacher training, and so "
                                 "every number after it, differs between thread counts", kind="int", minimum=1,
                                 none_means="torch's default: OMP_NUM_THREADS or the machine's cores")
    seed: int = option(0, "seed of the data subset, teacher, projector and stage 1/3 methods", kind="int",
                       minimum=0)
    out: str = option("dntk-out", "output folder; rerunning resumes from what is there")
    progress: bool = option(True, "progress bars", kind="bool", inverse="--quiet")

    @classmethod
    def from_options(cls, **options) -> "RunConfig":
        """Build from flat option names (the flags' names: m=200, distill="wmdd", gd_mode=...)."""
        sections = {name: {} for name in SECTIONS}
        top = {}
        where = _option_index()
        for key, value in options.items():
            if key not in where:
                raise DNTKError(f"unknown setting {key!r}; valid names: {', '.join(sorted(where))}")
            section, fname = where[key]
            if isinstance(value, os.PathLike):  # out=Path(...), data_root=Path(...)
                value = os.fspath(value)
            (sections[section] if section else top)[fname] = value
        return cls(**{name: SECTIONS[name](**vals) for name, vals in sections.items()}, **top)

    def to_dict(self) -> dict:
        return asdict(self)

    def check_numbers(self) -> None:
        """Refuse every value outside its field's range or choices (None only where it means a default)."""
        for section, f, value in _walk(self):
            check_value(f, value)

    def resolved(self, model_name: str | None = None) -> "RunConfig":
        """A copy with every value checked and dataset-dependent defaults filled in. model_name: the
        name recorded for a model object passed to :func:`dntk.run` (then ``teacher.model`` is not a spec)."""
        from .training.teacher import default_epochs, default_image_size, default_model

        from .resources import check_device

        c = copy.deepcopy(self)
        c.check_numbers()
        check_device(c.device)
        if c.data.dataset == "hf-disk" and c.data.image_size is not None:
            raise DNTKError("--image-size applies to images; hf-disk holds token ids (use --max-length)")
        if model_name is not None:
            c.teacher.model = model_name
        elif c.teacher.model is None:
            if c.data.dataset == "hf-disk":
                raise DNTKError("--dataset hf-disk holds token ids: name a model that takes them, e.g. --model hf:DIR "
                                "(a save_pretrained folder) or --model path/to/file.py:build")
            c.teacher.model = default_model(c.data.dataset)
        from .models.registry import parse_model

        spec = parse_model(c.teacher.model) if model_name is None else None
        if c.teacher.pretrained and (spec is None or spec.kind not in ("torchvision", "timm")):
            raise DNTKError(f"--pretrained loads torchvision's or timm's own weights; --model {c.teacher.model} has "
                            "none (give trained weights with --checkpoint)")
        if c.data.image_size is None and c.data.dataset != "hf-disk":
            c.data.image_size = default_image_size(c.data.dataset)
        if c.teacher.epochs is None:
            c.teacher.epochs = default_epochs(c.data.dataset)
        if c.kernel.m is None:
            c.kernel.m = 500
        if c.distill.method == "none" and not c.distill.load and c.gradients.budget is not None \
                and c.gradients.budget > c.kernel.m:  # with stage 1, m = ipc·C is checked once C is known
            raise DNTKError(f"--budget {c.gradients.budget} is larger than --m {c.kernel.m}; choose s ≤ m")
        if c.teacher.base_model == "student" and c.distill.method == "none" and not c.distill.load:
            raise DNTKError("--base-model student trains on a distilled set: add --distill {random,kcenter,wmdd}")
        if c.gradients.method != "none" and c.features.test_features == "stream":
            raise DNTKError("--gradient-distill evaluates synthetic sets on the stored test features: use "
                            "--test-features store (the default) with it")
        if c.gradients.method in NEEDS_BUDGET and c.gradients.budget is None:
            raise DNTKError(f"--gradient-distill {c.gradients.method} needs --budget s (gradients per class kernel)")
        return c


def _walk(cfg):
    """(section name or None, field, value) for every leaf setting of a RunConfig."""
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        if f.name in SECTIONS:
            if not isinstance(value, SECTIONS[f.name]):
                raise DNTKError(f"RunConfig.{f.name} must be a {SECTIONS[f.name].__name__}, got {type(value).__name__}; "
                                "build configs with RunConfig.from_options(...) or the section dataclasses")
            for g in fields(value):
                yield f.name, g, getattr(value, g.name)
        else:
            yield None, f, value


def _option_index() -> dict:
    """flat option name → (section or None, field name); names are unique by construction."""
    index = {}
    for section, f, _ in _walk(RunConfig()):
        name = option_name(f)
        assert name not in index, f"two settings share the name {name}"
        index[name] = (section, f.name)
    return index


def section_fields(section: str | None, include=None, exclude=()):
    """The fields of one section (None: RunConfig's own), filtered by name."""
    cls = SECTIONS[section] if section else RunConfig
    out = []
    for f in fields(cls):
        if section is None and f.name in SECTIONS:
            continue
        if not f.metadata.get("cli", True) or f.name in exclude or (include is not None and f.name not in include):
            continue
        out.append(f)
    return out


# --- argparse from the fields ------------------------------------------------------------------------------
def _argparse_type(f):
    meta = f.metadata

    def parse(text: str):
        if meta["kind"] == "ints":
            try:
                value = [int(v) for v in text.split(",")]
            except ValueError:
                raise argparse.ArgumentTypeError(f"must be {_range_text(meta)}, got {text!r}") from None
        else:
            try:
                value = int(text) if meta["kind"] == "int" else float(text)
            except ValueError:
                raise argparse.ArgumentTypeError(f"must be {_range_text(meta)}, got {text!r}") from None
        try:
            check_value(f, value)
        except DNTKError:
            raise argparse.ArgumentTypeError(f"must be {_range_text(meta)}, got {text}") from None
        return value

    parse.__name__ = _range_text(meta)
    return parse


def _checked_text(check):
    def parse(text: str):
        try:
            check(text)
        except DNTKError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return text

    parse.__name__ = "value"
    return parse


def int_at_least(minimum: int):
    """argparse type for a verb-only integer flag: an integer ≥ minimum."""
    f = field(default=None, metadata={"kind": "int", "minimum": minimum, "maximum": None, "above": False,
                                      "choices": None, "none_means": None, "flag": "--value"})
    f.name = "value"
    return _argparse_type(f)


def default_text(f) -> str:
    meta = f.metadata
    if f.default is None or (f.default is MISSING and meta.get("none_means")):
        return meta.get("none_means") or "none"
    return str(f.default)


def add_options(parser: argparse.ArgumentParser, section: str | None, *, include=None, exclude=(), required=()):
    """Add the flags of one config section to ``parser`` (dest = :func:`option_name`)."""
    group = parser.add_argument_group(section or "general") if section else parser
    for f in section_fields(section, include, exclude):
        meta = f.metadata
        dest = option_name(f)
        kw = {"dest": dest, "help": f"{meta['help']} (default: {default_text(f)})"}
        if f.name in required:
            kw["required"] = True
            kw["help"] = meta["help"]
        if meta["kind"] == "bool":
            if meta["inverse"]:
                group.add_argument(meta["inverse"], action="store_false", dest=dest, help=f"no {meta['help']}")
            else:
                group.add_argument(_flag(f), *meta["aliases"], action="store_true", **kw)
            continue
        if meta["kind"] in ("int", "float", "ints"):
            kw["type"] = _argparse_type(f)
        elif meta.get("check") is not None:
            kw["type"] = _checked_text(meta["check"])
        elif meta["choices"]:
            kw["choices"] = meta["choices"]
        kw["default"] = f.default if f.default is not MISSING else f.default_factory()
        group.add_argument(_flag(f), *meta["aliases"], **kw)


def options_from_args(args: argparse.Namespace) -> dict:
    """The flat settings an argparse namespace holds (every known option name present in it)."""
    names = _option_index()
    return {k: v for k, v in vars(args).items() if k in names}
