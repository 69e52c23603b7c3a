"""The one validation layer: every public function checks its arguments through these, so that bad
input is a :class:`~dntk.errors.DNTKError` naming the argument, the value given and the fix — never a
raw AttributeError/IndexError from deep inside, and never a nonsense value silently replaced by a
default ("correct or refuse").

Scalars: :func:`count` (an integer ≥ 1, or ≥ ``minimum``), :func:`nonnegative` (a finite real ≥ 0),
:func:`seed` (an integer ≥ 0). Bools are refused wherever a number belongs (``True`` is not a
count), floats wherever an integer belongs (``seed=1.7`` is not ``1``); numpy integers are accepted
and returned as Python ints.

Arrays: :func:`tensor` (a torch tensor or numpy array; lists only where the caller allows them),
:func:`labels` (class indices [n] or [n, 1] → int64 [n]), :func:`predictions` (scores [n ≥ 1, C] →
float64), :func:`kernel` (square, non-empty, finite → float64). Each takes ``where`` — the public
function's name, put in front of the message — so the user reads which call refused what.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch

from .errors import DNTKError, require_int


def _prefix(where: str | None) -> str:
    return f"{where}: " if where else ""


def _is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool)


def count(value, name: str, fix: str = "pass a positive integer", *, minimum: int = 1, where: str | None = None) -> int:
    """``value`` as a Python int if it is an integer ≥ ``minimum`` (a numpy integer is accepted; a bool,
    a float — also 2.0 — a string or None is refused), else a DNTKError naming ``name``, the value and ``fix``."""
    if isinstance(value, np.integer) and not _is_bool(value):
        value = int(value)
    require_int(value, f"{_prefix(where)}{name}", minimum, fix)
    return value


def nonnegative(value, name: str, fix: str = "pass a real number ≥ 0", *, where: str | None = None) -> float:
    """``value`` as a float if it is a finite real number ≥ 0 (int, float or numpy scalar; not a bool or a
    string), else a DNTKError naming ``name``, the value and ``fix``."""
    ok = isinstance(value, numbers.Real) and not _is_bool(value) and math.isfinite(float(value)) and float(value) >= 0
    if not ok:
        raise DNTKError(f"{_prefix(where)}{name} must be a finite real number ≥ 0, got {value!r}; {fix}")
    return float(value)


def seed(value, name: str = "seed", *, where: str | None = None) -> int:
    """``value`` as a Python int if it is an integer ≥ 0 (numpy integers accepted); 1.7, True or "0" are
    refused — a seed is never rounded to another one."""
    return count(value, name, "pass a non-negative integer seed (e.g. seed=0)", minimum=0, where=where)


_KINDS = {"float": "real numbers", "int": "integers", None: "numbers"}


def tensor(x, name: str, *, ndim=None, dtype: str | None = "float", finite: bool = True, nonempty: bool = True,
           lists: bool = False, where: str | None = None) -> torch.Tensor:
    """A torch tensor from ``x`` (a tensor — returned as is, not copied —, or a numpy array, converted
    without a copy; nested lists/tuples of numbers only when ``lists``), checked:

    - ``ndim``: the number of dimensions (an int or a tuple of allowed ones);
    - ``dtype``: ``"float"`` — real numbers (floating or integer, not bool/complex), returned as they
      are; ``"int"`` — an integer dtype (no floats, no bools); None — anything numeric;
    - ``finite``: no NaN or ±inf (the first offending positions are named);
    - ``nonempty``: at least one element.

    Refused with a DNTKError naming ``name``, what it is and what to pass."""
    p = _prefix(where)
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, np.ndarray) or (lists and isinstance(x, (list, tuple))):
        try:
            a = np.asarray(x)
        except (TypeError, ValueError) as err:
            raise DNTKError(f"{p}{name} could not be read as an array ({err}); pass a torch tensor or numpy array") from None
        if a.dtype == object or a.dtype.kind in "USV":
            raise DNTKError(f"{p}{name} must hold numbers, got a numpy array of dtype {a.dtype}; pass a numeric tensor")
        t = torch.from_numpy(np.ascontiguousarray(a)) if a.dtype.kind != "f" or a.dtype.itemsize != 2 else \
            torch.from_numpy(a.astype(np.float32))
    else:
        allowed = "a torch tensor, a numpy array or a (nested) list of numbers" if lists else \
            "a torch tensor or a numpy array"
        raise DNTKError(f"{p}{name} must be {allowed}, got {type(x).__name__}"
                        + ("; convert it with torch.tensor(...)" if isinstance(x, (list, tuple)) else ""))
    if ndim is not None:
        dims = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if t.dim() not in dims:
            raise DNTKError(f"{p}{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(t.shape)}")
    if t.is_complex():
        raise DNTKError(f"{p}{name} must hold {_KINDS[dtype]}, got complex dtype {t.dtype}")
    if dtype == "float" and t.dtype == torch.bool:
        raise DNTKError(f"{p}{name} must hold real numbers, got dtype torch.bool; pass x.double() if that is meant")
    if dtype == "int" and (t.is_floating_point() or t.dtype == torch.bool):
        raise DNTKError(f"{p}{name} must hold integers (class indices), got dtype {t.dtype}; pass x.long() if its values "
                        "are whole numbers")
    if nonempty and t.numel() == 0:
        raise DNTKError(f"{p}{name} is empty (shape {tuple(t.shape)}); pass at least one entry")
    if finite and t.is_floating_point() and t.device.type != "meta" and not bool(torch.isfinite(t).all()):
        bad = torch.nonzero(~torch.isfinite(t))[:5].tolist()
        raise DNTKError(f"{p}{name} contains NaN or inf (first at positions {[tuple(b) for b in bad]}); check how it was "
                        "computed (a diverged model, an overflow in float32 or missing data)")
    return t


def labels(y, name: str = "labels", n: int | None = None, C: int | None = None, *, where: str | None = None) -> torch.Tensor:
    """Class indices int64 [n] on the CPU from [n] or [n, 1] (tensor, numpy array or list); one-hot or score
    matrices [n, C > 1] are refused (pass ``y.argmax(1)``), floats and bools too. ``n``: the number of
    rows required; ``C``: the values must lie in 0..C−1."""
    p = _prefix(where)
    t = tensor(y, name, dtype=None, finite=False, nonempty=False, lists=True, where=where)
    if t.dim() == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() != 1:
        raise DNTKError(f"{p}{name} must be class indices [n] (or [n, 1]), got shape {tuple(t.shape)}"
                        + (f"; for one-hot labels pass {name}.argmax(1)" if t.dim() == 2 else ""))
    if t.is_floating_point() or t.dtype == torch.bool:
        raise DNTKError(f"{p}{name} must be integer class indices, got {t.dtype}; pass {name}.long() if they are whole "
                        "numbers")
    if n is not None and t.shape[0] != n:
        raise DNTKError(f"{p}{n} rows expected but {name} has {t.shape[0]}; pass one label per input")
    if C is not None and t.numel() and (int(t.min()) < 0 or int(t.max()) >= C):
        raise DNTKError(f"{p}{name} must lie in 0..{C - 1} for {C} classes, found {int(t.min())}..{int(t.max())}")
    return t.cpu().long()


def predictions(p, name: str = "predictions", n: int | None = None, C: int | None = None, *, finite: bool = False,
                lists: bool = True, where: str | None = None) -> torch.Tensor:
    """Scores float64 [n ≥ 1, C] (one row per input) from a tensor or numpy array (lists allowed unless
    ``lists=False``); a 1-D vector is refused (pass ``p[:, None]`` for one output, or the [n, C] scores).
    NaN rows are allowed unless ``finite`` (metrics count them as misses)."""
    pre = _prefix(where)
    t = tensor(p, name, dtype="float", finite=finite, nonempty=False, lists=lists, where=where)
    if t.dim() != 2 or t.shape[0] == 0 or t.shape[1] == 0:
        raise DNTKError(f"{pre}{name} must be [n ≥ 1, C] (one row of scores per input, C ≥ 1), got shape {tuple(t.shape)}"
                        + ("; pass the [n, C] scores, not their argmax" if t.dim() == 1 else ""))
    if n is not None and t.shape[0] != n:
        raise DNTKError(f"{pre}{name} has {t.shape[0]} rows but {n} are expected; pass one row per input")
    if C is not None and t.shape[1] != C:
        raise DNTKError(f"{pre}{name} has {t.shape[1]} columns but {C} are expected; pass one column per class")
    return t.double()


def kernel(K, name: str = "K", *, classes: bool = True, finite: bool = True, where: str | None = None) -> torch.Tensor:
    """A kernel float64 [m, m] or (``classes``) [C, m, m] with m ≥ 1, from a tensor or numpy array;
    non-square, empty or (``finite``) non-finite kernels are refused. Symmetry is not required."""
    pre = _prefix(where)
    t = tensor(K, name, ndim=(2, 3) if classes else 2, dtype="float", finite=finite, nonempty=False, where=where)
    if t.shape[-1] != t.shape[-2] or t.shape[-1] == 0 or (t.dim() == 3 and t.shape[0] == 0):
        raise DNTKError(f"{pre}{name} must be square and non-empty ([m, m]{' or [C, m, m]' if classes else ''}, m ≥ 1), "
                        f"got shape {tuple(t.shape)}")
    return t.double()


def real_model(model, where: str | None = None) -> None:
    """Refuse a model whose parameters have no values (the ``meta`` device): every gradient and output
    of it would be undefined."""
    if not isinstance(model, torch.nn.Module):
        raise DNTKError(f"{_prefix(where)}model must be a torch.nn.Module, got {type(model).__name__}")
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if meta:
        raise DNTKError(f"{_prefix(where)}the model's tensors {', '.join(meta[:3])}{' ...' if len(meta) > 3 else ''} are on "
                        "the meta device (shapes without values); materialise it first, e.g. model.to_empty(device='cpu') "
                        "and then load_state_dict(...)")
