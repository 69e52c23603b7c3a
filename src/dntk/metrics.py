"""How faithfully a kernel model reproduces the network, and how two kernels compare.

predictions / logits: [n, C]; labels: [n]; kernels: [C, m, m] (or [m, m]).
"""

from __future__ import annotations

import torch

from .errors import DNTKError


def _pair(a: torch.Tensor, b: torch.Tensor, what: str):
    if a.shape != b.shape:
        raise DNTKError(f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    return a.double(), b.double()


def fidelity(predictions: torch.Tensor, logits: torch.Tensor) -> float:
    """Fraction of inputs where argmax of the kernel model equals the network's argmax."""
    p, f = _pair(predictions, logits, "fidelity")
    return float((p.argmax(1) == f.argmax(1)).double().mean())


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of inputs whose argmax prediction equals the true label."""
    if predictions.shape[0] != labels.shape[0]:
        raise DNTKError(f"accuracy: {predictions.shape[0]} predictions but {labels.shape[0]} labels")
    return float((predictions.argmax(1).cpu() == labels.cpu()).double().mean())


def logit_mse(predictions: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over inputs and classes of (f_K,c(x) − f_c(x))²; ``logits`` may be any targets [n, C]
    (e.g. one-hot labels)."""
    p, f = _pair(predictions, logits, "mse")
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
