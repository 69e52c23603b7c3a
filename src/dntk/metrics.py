"""How faithfully a kernel model reproduces the network, and how two kernels compare.

predictions / logits: [n, C]; labels: [n]; kernels: [C, m, m] (or [m, m]).
"""

from __future__ import annotations

import torch

from .errors import DNTKError


def _tensor(x, what: str, name: str) -> torch.Tensor:
    """A tensor from a tensor or numpy array (lists too); anything else is refused by name."""
    if isinstance(x, torch.Tensor):
        return x
    try:
        import numpy as np

        if isinstance(x, (np.ndarray, list, tuple)):
            return torch.as_tensor(np.asarray(x))
    except (TypeError, ValueError):
        pass
    raise DNTKError(f"{what}: {name} must be a tensor or numpy array, got {type(x).__name__}")


def _scores(x, what: str, name: str) -> torch.Tensor:
    t = _tensor(x, what, name)
    if t.dim() != 2 or t.shape[0] == 0:
        raise DNTKError(f"{what}: {name} must be [n ≥ 1, C] (one row of scores per input), got shape {tuple(t.shape)}")
    return t.double()


def _pair(a, b, what: str):
    a, b = _tensor(a, what, "the first argument"), _tensor(b, what, "the second argument")
    if a.shape != b.shape:
        raise DNTKError(f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    return a.double(), b.double()


def _score_pair(a, b, what: str):
    a, b = _scores(a, what, "predictions"), _scores(b, what, "the second argument")
    if a.shape != b.shape:
        raise DNTKError(f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    return a, b


def _argmax(p: torch.Tensor) -> torch.Tensor:
    """Row argmax with rows holding a NaN mapped to −1, so that they count as misses (torch's argmax
    of a NaN row is the NaN's position, which would count as a hit)."""
    return torch.where(torch.isnan(p).any(1), torch.full_like(p[:, 0], -1).long(), p.argmax(1))


def fidelity(predictions, logits) -> float:
    """Fraction of inputs where argmax of the kernel model equals the network's argmax (predictions,
    logits [n, C]); a row with a NaN is a miss."""
    p, f = _score_pair(predictions, logits, "fidelity")
    a, b = _argmax(p), _argmax(f)
    return float(((a == b) & (a >= 0)).double().mean())


def accuracy(predictions, labels) -> float:
    """Fraction of inputs whose argmax prediction equals the true label. predictions [n, C]; labels
    [n] or [n, 1] integer class indices (one-hot labels are refused: pass labels.argmax(1)); a row with
    a NaN is a miss."""
    p = _scores(predictions, "accuracy", "predictions")
    y = _tensor(labels, "accuracy", "labels")
    if y.dim() == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.dim() != 1:
        raise DNTKError(f"accuracy: labels must be class indices [n] (or [n, 1]), got shape {tuple(y.shape)}"
                        + ("; for one-hot labels pass labels.argmax(1)" if y.dim() == 2 else ""))
    if y.is_floating_point() or y.dtype == torch.bool:
        raise DNTKError(f"accuracy: labels must be integer class indices, got {y.dtype}")
    if p.shape[0] != y.shape[0]:
        raise DNTKError(f"accuracy: {p.shape[0]} predictions but {y.shape[0]} labels")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= p.shape[1]):
        raise DNTKError(f"accuracy: labels must lie in 0..{p.shape[1] - 1} for {p.shape[1]} classes, found "
                        f"{int(y.min())}..{int(y.max())}")
    return float((_argmax(p).cpu() == y.cpu().long()).double().mean())


def logit_mse(predictions: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over inputs and classes of (f_K,c(x) − f_c(x))²; ``logits`` may be any targets [n, C]
    (e.g. one-hot labels)."""
    p, f = _score_pair(predictions, logits, "mse")
    return float(((p - f) ** 2).mean())


def _classes(K: torch.Tensor) -> torch.Tensor:
    return K.unsqueeze(0) if K.dim() == 2 else K


def kernel_conditioning(K: torch.Tensor, normalize: str | None = "trace", floor: float = 1e-12) -> dict:
    """Condition number and minimum eigenvalue of each class's (trace-normalised) training kernel,
    averaged over classes. Eigenvalues are clamped at ``floor`` (as the paper's reproduction does)
    so a singular kernel gives a large, finite condition number.

    Returns {"condition_number", "min_eigenvalue", "per_class": [{...}, ...]}."""
    from .kernels.normalisation import class_scale

    K = _classes(K).double()
    rows = []
    for c in range(K.shape[0]):
        Kc = (K[c] + K[c].T) / 2
        if normalize == "trace":
            nu = float(class_scale(kernels=Kc, check=False)[0])
            if nu > 0:
                Kc = Kc / nu
        lam = torch.linalg.eigvalsh(Kc)
        lo, hi = float(lam[0]), float(lam[-1])
        rows.append({"condition_number": max(hi, floor) / max(lo, floor), "min_eigenvalue": lo, "max_eigenvalue": hi})
    return {"condition_number": sum(r["condition_number"] for r in rows) / len(rows),
            "min_eigenvalue": sum(r["min_eigenvalue"] for r in rows) / len(rows), "per_class": rows}


def kernel_relative_error(K_approx: torch.Tensor, K_ref: torch.Tensor) -> float:
    """‖K̂_c − K_c‖_F / ‖K_c‖_F averaged over classes."""
    a, b = _pair(_classes(K_approx), _classes(K_ref), "kernel_relative_error")
    return float(((a - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1)).mean())


def kernel_alignment(K1: torch.Tensor, K2: torch.Tensor) -> float:
    """⟨K1, K2⟩_F / (‖K1‖_F ‖K2‖_F) averaged over classes (1 = identical up to scale)."""
    a, b = _pair(_classes(K1), _classes(K2), "kernel_alignment")
    a, b = a.flatten(1), b.flatten(1)
    return float(((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean())


def summarize(predictions: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor | None,
              targets: torch.Tensor | None = None) -> dict:
    """The kernel model's test metrics.

    predictions: the kernel model's outputs [n, C]; logits: the network's (teacher's) logits [n, C];
    labels: true labels [n] or None; targets: what the kernel model was regressed on, on the test
    inputs [n, C] (one-hot labels when it was fitted on one-hot targets); None means the logits.

    Returns ``fidelity`` (argmax agreement with the logits), ``mse`` (mean squared error against
    ``targets``, the quantity the regression fits), ``mse_vs_teacher_logits`` (against the logits,
    equal to ``mse`` when the targets are the logits) and, with labels, ``accuracy``."""
    out = {"fidelity": fidelity(predictions, logits),
           "mse": logit_mse(predictions, logits if targets is None else targets),
           "mse_vs_teacher_logits": logit_mse(predictions, logits)}
    if labels is not None:
        out["accuracy"] = accuracy(predictions, labels)
    return out
