"""Data that is not (only) images: a :class:`SampleSet` of any inputs, built from a torch Dataset or a
Hugging Face ``datasets`` folder.

Every stage reads data through the same few members, which :class:`~dntk.data.images.ImageSet` has
too: ``len``, ``labels`` int64 [n], ``classes``, ``num_classes``, ``tensors(index)`` → (inputs, labels),
``subset(index)``, ``class_counts()``, ``name`` and ``image_shape`` (None for non-image inputs). The
inputs are a sample batch of :mod:`dntk.samples`: a tensor, a tuple or a dict of tensors with the
sample axis first (token ids and masks as integer tensors, padded ones as
:class:`~dntk.samples.PaddedTokens`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .. import samples
from ..errors import DNTKError


@dataclass
class SampleSet(Dataset):
    """inputs: n samples (:mod:`dntk.samples` form); labels int64 [n]; classes: names, index = label."""

    inputs: object
    labels: torch.Tensor
    classes: list
    name: str = "samples"
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        n = samples.count(self.inputs, "SampleSet.inputs")
        self.labels = torch.as_tensor(self.labels)
        if self.labels.dim() != 1 or self.labels.shape[0] != n or self.labels.is_floating_point():
            raise DNTKError(f"labels must be integers [n={n}] (one class index per sample), got "
                            f"{str(self.labels.dtype).replace('torch.', '')} {tuple(self.labels.shape)}")
        self.labels = self.labels.long()
        if n and (int(self.labels.min()) < 0 or int(self.labels.max()) >= len(self.classes)):
            raise DNTKError(f"labels must lie in 0..{len(self.classes) - 1} for {len(self.classes)} classes; found "
                            f"{int(self.labels.min())}..{int(self.labels.max())}")

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __getitem__(self, i):
        x = samples.take(self.inputs, [i])
        return samples.map_leaves(lambda t: t[0], x), self.labels[i]

    def tensors(self, index=None):
        """(inputs of the samples ``index`` (default all), labels [m])."""
        if index is None:
            return self.inputs, self.labels.clone()
        index = torch.as_tensor(index, dtype=torch.long)
        return samples.take(self.inputs, index), self.labels[index]

    def subset(self, index) -> "SampleSet":
        index = torch.as_tensor(index, dtype=torch.long)
        return SampleSet(samples.take(self.inputs, index), self.labels[index], list(self.classes), self.name,
                         dict(self.info))

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self):
        """[c, h, w] when the inputs are one float tensor [n, c, h, w], else None."""
        return tuple(self.inputs.shape[1:]) if samples.is_images(self.inputs) else None

    def class_counts(self) -> list[int]:
        return torch.bincount(self.labels, minlength=self.num_classes).tolist()

    def describe(self) -> str:
        return samples.describe(self.inputs)


def as_sample_set(data, *, classes=None, name: str | None = None, pad_id: int = 0):
    """Any of: an ImageSet or SampleSet (returned as it is), or a torch Dataset yielding ``(x, y)`` (x a
    tensor, a tuple/list or a dict of tensors) or dicts with a ``label``/``labels`` entry — materialised
    in memory as a SampleSet. Integer 1-D sequences of different lengths in a dict are padded at the end
    with ``pad_id`` (an ``attention_mask`` is made if there is none) and kept as PaddedTokens, so a
    batch is cut to its longest sequence; other entries must have one shape. classes: names (default:
    the dataset's ``classes`` attribute, else "0".."C-1" for C = max label + 1)."""
    from .images import ImageSet

    if isinstance(data, (ImageSet, SampleSet)):
        return data
    if not isinstance(data, Dataset) and not hasattr(data, "__getitem__"):
        raise DNTKError(f"a data set must be a torch Dataset yielding (x, y), got {type(data).__name__}")
    try:
        n = len(data)
    except TypeError:
        raise DNTKError("the data set has no len(); dntk needs a map-style torch Dataset") from None
    if n == 0:
        raise DNTKError("the data set is empty")
    xs, ys = [], []
    for i in range(n):
        item = data[i]
        if isinstance(item, dict):
            item = {k: torch.as_tensor(v) for k, v in item.items()}
        elif isinstance(item, (list, tuple)) and len(item) == 2 and not isinstance(item[1], torch.Tensor):
            item = (item[0], torch.as_tensor(item[1]))
        x, y = samples.split_item(item if not isinstance(item, torch.Tensor) else (item,))
        if y is None:
            raise DNTKError(f"sample {i} of the data set has no label; yield (x, y) pairs or dicts with 'label'")
        xs.append(x)
        ys.append(int(y))
    inputs = _stack(xs, pad_id)
    labels = torch.tensor(ys, dtype=torch.long)
    if classes is None:
        classes = list(getattr(data, "classes", None) or [str(c) for c in range(int(labels.max()) + 1)])
    return SampleSet(inputs, labels, list(classes), name or type(data).__name__)


def _stack(xs: list, pad_id: int):
    first = xs[0]
    if isinstance(first, torch.Tensor):
        return _stack_one([x for x in xs], "x")
    if isinstance(first, tuple):
        return tuple(_stack_one([x[j] for x in xs], f"x[{j}]") for j in range(len(first)))
    keys = list(first)
    lengths = {k: {x[k].shape[0] if x[k].dim() else 0 for x in xs} for k in keys}
    ragged = [k for k in keys if len(lengths[k]) > 1]
    if not ragged:
        return {k: _stack_one([x[k] for x in xs], k) for k in keys}
    bad = [k for k in ragged if xs[0][k].dim() != 1 or xs[0][k].is_floating_point()]
    if bad:
        raise DNTKError(f"entries {bad} have different shapes across samples and are not integer sequences; pad them "
                        "to one shape before passing the data set")
    L = max(max(lengths[k]) for k in ragged)
    out = {}
    for k in keys:
        if k in ragged:
            fill = pad_id if k == "input_ids" else 0
            out[k] = torch.stack([torch.nn.functional.pad(x[k], (0, L - x[k].shape[0]), value=fill) for x in xs])
        else:
            out[k] = _stack_one([x[k] for x in xs], k)
    if "attention_mask" not in out:
        lens = torch.tensor([x[ragged[0]].shape[0] for x in xs])
        out["attention_mask"] = (torch.arange(L)[None, :] < lens[:, None]).long()
    return samples.PaddedTokens(out, seq_keys=list(dict.fromkeys(ragged + ["attention_mask"])))


def _stack_one(ts, what):
    shapes = {tuple(t.shape) for t in ts}
    if len(shapes) > 1:
        raise DNTKError(f"{what} has different shapes across samples ({sorted(shapes)[:3]}); give every sample one "
                        "shape (resize images, pad sequences)")
    return torch.stack(ts)


# --- Hugging Face datasets saved with save_to_disk ---------------------------------------------------------
TOKEN_COLUMNS = ("input_ids", "attention_mask", "token_type_ids")


def hf_disk(root, *, max_length: int | None = None, pad_id: int = 0, n_test: int | None = None) -> tuple:
    """(train, test) SampleSets of a ``datasets.DatasetDict`` saved with ``save_to_disk`` at ``root``:
    splits ``train`` and ``test`` (or ``validation``); columns ``input_ids``, optional
    ``attention_mask`` and ``token_type_ids``, and ``label`` or ``labels``. Sequences are padded at the
    end with ``pad_id`` (mask 0): with ``max_length``, every sequence is cut or padded to exactly
    that many tokens; without, each batch is padded to its own longest sequence (PaddedTokens).
    Class names come from a ``ClassLabel`` feature, else they are the label values."""
    from ..models.registry import require_extra

    datasets = require_extra("datasets", "hf")
    root = Path(root)
    if not root.exists():
        raise DNTKError(f"--data-root {root} does not exist; point it at a folder written by DatasetDict.save_to_disk")
    try:
        dd = datasets.load_from_disk(str(root))
    except Exception as e:
        raise DNTKError(f"--data-root {root} is not a datasets folder written by save_to_disk ({e})") from None
    if not isinstance(dd, datasets.DatasetDict):
        raise DNTKError(f"{root} holds one split; save a DatasetDict with 'train' and 'test' (or 'validation') splits")
    test_name = next((s for s in ("test", "validation", "val") if s in dd), None)
    if "train" not in dd or test_name is None:
        raise DNTKError(f"{root} has splits {sorted(dd)}; dntk needs 'train' and 'test' (or 'validation')")
    train_cols = set(dd["train"].column_names)
    label = next((c for c in ("label", "labels") if c in train_cols), None)
    if "input_ids" not in train_cols or label is None:
        raise DNTKError(f"{root}: the train split has columns {sorted(train_cols)}; dntk needs 'input_ids' and 'label' "
                        "(or 'labels') — tokenize the text first (dataset.map(tokenizer))")
    feature = dd["train"].features[label]
    names = list(getattr(feature, "names", None) or [])
    values = sorted(set(dd["train"][label]) | set(dd[test_name][label]))
    if not names:
        if any(not isinstance(v, int) for v in values):
            raise DNTKError(f"{root}: labels must be integers or a ClassLabel; found {values[:5]}")
        names = [str(v) for v in range(max(values) + 1)]
    if min(values) < 0 or max(values) >= len(names):
        raise DNTKError(f"{root}: label values {values[:10]} fall outside the {len(names)} class names")
    if len(names) < 2:
        raise DNTKError(f"{root}: only one class ({names}); a classifier needs at least two")
    out = []
    for split in ("train", test_name):
        ds = dd[split]
        cols = [c for c in TOKEN_COLUMNS if c in ds.column_names]
        rows = {c: [torch.as_tensor(v, dtype=torch.long) for v in ds[c]] for c in cols}
        if not rows["input_ids"]:
            raise DNTKError(f"{root}: the {split} split is empty")
        lens = torch.tensor([len(r) for r in rows["input_ids"]])
        if int(lens.min()) == 0:
            raise DNTKError(f"{root}: the {split} split has an empty sequence (row {int(torch.argmin(lens))})")
        L = max_length if max_length is not None else int(lens.max())
        inputs = {}
        for c in cols:
            fill = pad_id if c == "input_ids" else 0
            inputs[c] = torch.stack([torch.nn.functional.pad(r[:L], (0, max(0, L - len(r))), value=fill)
                                     for r in rows[c]])
        if "attention_mask" not in inputs:
            inputs["attention_mask"] = (torch.arange(L)[None, :] < lens.clamp(max=L)[:, None]).long()
        x = inputs if max_length is not None else samples.PaddedTokens(inputs, seq_keys=list(inputs))
        sset = SampleSet(x, torch.tensor(ds[label], dtype=torch.long), names, root.name,
                         {"split": split, "max_length": L, "truncated": int((lens > L).sum()), "pad_id": pad_id})
        out.append(sset)
    train, test = out
    if n_test is not None:
        from .images import balanced_indices

        test = test.subset(balanced_indices(test.labels, min(n_test, len(test)), test.num_classes))
    return train, test
