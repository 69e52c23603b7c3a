"""How faithfully a kernel model reproduces the network, and how two kernels compare.

predictions / logits: [n, C]; labels: [n]; kernels: [C, m, m] (or [m, m]).
"""

from __future__ import annotations

import torch

from . import validate as V
from .errors import DNTKError


def _pair(a, b, what: str):
    a = V.tensor(a, "the first argument", ndim=(2, 3), lists=True, where=what)
    b = V.tensor(b, "the second argument", ndim=(2, 3), lists=True, where=what)
    if a.shape != b.shape:
        raise DNTKError(f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    return a.double(), b.double()


def _score_pair(a, b, what: str):
    a, b = V.predictions(a, "predictions", where=what), V.predictions(b, "the second argument", where=what)
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
    p = V.predictions(predictions, "predictions", where="accuracy")
    y = V.labels(labels, "labels", n=p.shape[0], C=p.shape[1], where="accuracy")
    return float((_argmax(p).cpu() == y.cpu().long()).double().mean())


def logit_mse(predictions: torch.Tensor, logits: torch.Tensor) -> float:
    """Mean over inputs and classes of (f_K,c(x) − f_c(x))²; ``logits`` may be any targets [n, C]
    (e.g. one-hot labels)."""
    p, f = _score_pair(predictions, logits, "mse")
    return float(((p - f) ** 2).mean())


def _classes(K: torch.Tensor) -> torch.Tensor:
    return K.unsqueeze(0) if K.dim() == 2 else K


def kernel_conditioning(K, normalize: str | None = "trace", floor: float | None = None) -> dict:
    """Condition number λ_max / λ_min and the extreme eigenvalues of each class's (trace-normalised)
    training kernel K [C, m, m] or [m, m] (tensor or numpy array), averaged over classes.

    The condition number is the true one of the symmetrised kernel, except that an eigenvalue below
    float64's resolution ``u·λ_max`` (u = 2.2e-16, the eigensolver's accuracy) is read as that floor:
    a singular kernel, or one whose condition exceeds 1/u ≈ 4.5e15, reports ≈ 4.5e15 and
    ``"resolved": False`` (its true λ_min cannot be told from round-off in float64). An explicit
    ``floor`` clamps both eigenvalues at that value instead (the paper's reproduction uses 1e-12).
    A kernel with an eigenvalue < 0 beyond round-off (−1e-8·max|λ| in float64 input, −1e-4 in
    float32) — an indefinite or negative matrix, not a Gram matrix — or an all-zero one is refused.

    Returns {"condition_number", "min_eigenvalue", "per_class": [{"condition_number", "min_eigenvalue",
    "max_eigenvalue", "resolved"}, ...]}."""
    raw = V.kernel(K, "K", where="kernel_conditioning")
    if floor is not None:
        floor = V.nonnegative(floor, "floor", "pass the smallest eigenvalue to resolve, or None", where="kernel_conditioning")
    if normalize not in ("trace", None):
        raise DNTKError(f"kernel_conditioning: normalize must be 'trace' or None, got {normalize!r}")
    in64 = not isinstance(K, torch.Tensor) or K.dtype == torch.float64
    tol = 1e-8 if in64 else 1e-4
    K = _classes(raw)
    rows = []
    for c in range(K.shape[0]):
        Kc = (K[c] + K[c].T) / 2
        if normalize == "trace":
            nu = float(torch.diagonal(Kc).mean())  # ν_c as dntk.kernels.class_scale has it (metrics lies below kernels, which import it)
            if nu > 0:
                Kc = Kc / nu
        lam = torch.linalg.eigvalsh(Kc)
        lo, hi = float(lam[0]), float(lam[-1])
        top = max(abs(lo), abs(hi))
        if top == 0 or lo < -tol * top:
            what = "all zero" if top == 0 else (f"negative (largest eigenvalue {hi:.3g})" if hi <= 0 else
                                                f"indefinite (eigenvalue {lo:.3g} < 0 beyond round-off)")
            raise DNTKError(f"kernel_conditioning: the kernel of class {c} is {what}, so it is not a Gram matrix "
                            "Φ Φᵀ and has no condition number as a kernel; pass the kernel itself (e.g. "
                            "FeatureResult.kernel()), not its negative or a difference of kernels")
        if floor is None:
            eps = 2.220446049250313e-16 * hi
            resolved = lo > eps
            cond = hi / max(lo, eps)
        else:
            resolved = lo > floor
            cond = max(hi, floor) / max(lo, floor) if max(hi, floor) > 0 else float("inf")
        rows.append({"condition_number": cond, "min_eigenvalue": lo, "max_eigenvalue": hi, "resolved": resolved})
    return {"condition_number": sum(r["condition_number"] for r in rows) / len(rows),
            "min_eigenvalue": sum(r["min_eigenvalue"] for r in rows) / len(rows), "per_class": rows}


def kernel_relative_error(K_approx, K_ref) -> float:
    """‖K̂_c − K_c‖_F / ‖K_c‖_F averaged over classes; K_approx, K_ref [C, m, m'] or [m, m'] (tensors or
    numpy arrays, finite, same shape)."""
    a, b = _pair(K_approx, K_ref, "kernel_relative_error")
    a, b = _classes(a), _classes(b)
    norm = b.flatten(1).norm(dim=1)
    if not bool((norm > 0).all()):
        raise DNTKError(f"kernel_relative_error: the reference kernel of class(es) {torch.nonzero(norm == 0).flatten().tolist()[:10]} "
                        "is all zero, so a relative error is undefined; compare against a non-zero kernel")
    return float(((a - b).flatten(1).norm(dim=1) / norm).mean())


def kernel_alignment(K1, K2) -> float:
    """⟨K1, K2⟩_F / (‖K1‖_F ‖K2‖_F) averaged over classes (1 = identical up to scale); K1, K2
    [C, m, m'] or [m, m'] (tensors or numpy arrays, finite, same shape)."""
    a, b = _pair(K1, K2, "kernel_alignment")
    a, b = _classes(a).flatten(1), _classes(b).flatten(1)
    if not bool(((a.norm(dim=1) > 0) & (b.norm(dim=1) > 0)).all()):
        raise DNTKError("kernel_alignment: a kernel is all zero, so the alignment (a cosine) is undefined; pass non-zero "
                        "kernels")
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
