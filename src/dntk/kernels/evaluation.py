"""Fitting the per-class kernel model and measuring it: the m-sweep of Figure 1 and the rank sweep
of Figure 5. Computation only; the figures are drawn by :mod:`dntk.report`."""

from __future__ import annotations


from .. import metrics
from .. import validate as V
from ..errors import DNTKError
from .krr import PerClassKRR

FIG5_RANKS = (1, 2, 3, 5, 8, 13, 20, 30, 50, 80, 130, 200, 300, 500, 1000)


def default_m_grid(m: int, C: int) -> list[int]:
    """A log-spaced grid of training-set sizes (multiples of C) below m, and m itself."""
    return sorted({v for v in (C, 2 * C, 3 * C, 5 * C, 7 * C, 10 * C, 15 * C, 20 * C, 30 * C, 40 * C, 50 * C,
                               75 * C, 100 * C) if v < m} | {m})


def fit_evaluate(train, targets, test, logits_test, labels_test, *, ridge: float, normalize: str | None = "trace",
                 targets_test=None) -> dict:
    """:func:`dntk.metrics.summarize` of PerClassKRR(ridge, normalize) fitted on (train, targets).

    train: features [C, m, k] (a tensor, a list of C [m_c, k] tensors, or a FeatureResult); targets
    [m, C] or C vectors; test: features [C, n, k]; logits_test [n, C]; labels_test [n] or None;
    targets_test [n, C]: the test inputs' targets of the kind ``targets`` holds (``mse`` is measured
    against them; None = the logits)."""
    pred = PerClassKRR(ridge=ridge, normalize=normalize).fit(train, targets).predict(test)
    return metrics.summarize(pred, logits_test, labels_test, targets_test)


def krr_curve(y_train, logits_test, labels_test, *, ridge: float, m_values, train=None, test=None, kernels=None,
              targets_test=None, device=None) -> list[dict]:
    """Metrics of the trace-normalised per-class KRR on the first m training points, for each m in
    ``m_values`` (training points are in balanced order, so every prefix is balanced).

    Either ``train`` / ``test`` FeatureResults (features [C, m, k] / [C, n, k]) or
    ``kernels=(K_train [C, m, m], K_test [C, n, m])``. y_train [m, C]; logits_test [n, C]; labels_test
    [n]; targets_test as in :func:`fit_evaluate`. Each row: m, the summary metrics, and the
    condition number / minimum eigenvalue of the trace-normalised training kernel. ``device``: where the
    solves run (:class:`PerClassKRR`)."""
    m_all = (train.features.shape[1] if kernels is None else V.tensor(kernels[0], "kernels[0]", ndim=3,
                                                                       where="krr_curve").shape[1]) \
        if (train is not None or kernels is not None) else None
    if m_all is None:
        raise DNTKError("krr_curve: pass train= and test= FeatureResults or kernels=(K_train, K_test)")
    m_values = [V.count(mm, "an m value", f"pass training-set sizes 1..{m_all}", where="krr_curve") for mm in m_values]
    if any(mm > m_all for mm in m_values):
        raise DNTKError(f"krr_curve: m_values {[mm for mm in m_values if mm > m_all]} exceed the {m_all} training points; "
                        f"pass sizes 1..{m_all}")
    rows = []
    for mm in m_values:
        model = PerClassKRR(ridge=ridge, normalize="trace", device=device)
        if kernels is None:
            sub = train.subset(slice(0, mm))
            pred = model.fit(sub, y_train[:mm]).predict(test)
            K = sub.kernel()
        else:
            K_train, K_test = kernels
            K = K_train[:, :mm, :mm]
            pred = model.fit_kernel(K, y_train[:mm]).predict_kernel(K_test[:, :, :mm])
        cond = metrics.kernel_conditioning(K)
        rows.append({"m": mm, **metrics.summarize(pred, logits_test, labels_test, targets_test),
                     "condition_number": cond["condition_number"], "min_eigenvalue": cond["min_eigenvalue"]})
    return rows


def rank_curve(train, targets, test, logits_test, labels_test, *, ridge: float, ranks=FIG5_RANKS,
               targets_test=None) -> list[dict]:
    """Figure 5: metrics of the rank-r Woodbury predictor (top r eigen-directions of each class
    kernel, absolute ridge) for every r ≤ min(m, k) in ``ranks``. train [C, m, k], test [C, n, k]."""
    F = train.features if hasattr(train, "features") else train
    rs = [r for r in ranks if r <= min(F.shape[1], F.shape[2])]
    model = PerClassKRR(ridge=ridge, normalize=None, form="dual").fit(train, targets)
    preds = model.sweep(test, ridges=(ridge,), ranks=rs)
    return [{"rank": r, **metrics.summarize(preds[(ridge, r)], logits_test, labels_test, targets_test)} for r in rs]


def compare_with_exact(pred_exact, logits_test, labels_test, approximations: dict, K_exact=None) -> list[dict]:
    """The end-to-end error of compressed kernel models against the exact-eNTK model on the same points.

    pred_exact [n, C]: the exact eNTK model's test predictions; logits_test [n, C] / labels_test [n]: the
    network's logits and the labels; approximations: {name: {"pred": [n, C] predictions, optional
    "K_train": [C, m, m] its training kernel}}; K_exact [C, m, m]: the exact training kernel. One row per
    approximation (the exact model first): its metrics against the network (:func:`dntk.metrics.summarize`),
    ``agreement_with_exact`` (argmax agreement with the exact model), ``relative_mse_to_exact``
    (‖pred − pred_exact‖² / ‖pred_exact‖²) and, where a training kernel is given, its
    ``kernel_relative_error`` and ``kernel_alignment`` against K_exact (raw kernels: a random projection
    estimates the exact kernel itself, not a rescaling of it)."""
    rows = [{"name": "exact eNTK", **metrics.summarize(pred_exact, logits_test, labels_test, None),
             "agreement_with_exact": 1.0, "relative_mse_to_exact": 0.0, "kernel_relative_error": 0.0,
             "kernel_alignment": 1.0}]
    ref = V.predictions(pred_exact, "pred_exact", where="compare_with_exact")
    for name, a in approximations.items():
        pred = V.predictions(a["pred"], f"approximations[{name!r}]['pred']", n=ref.shape[0], C=ref.shape[1],
                             where="compare_with_exact")
        row = {"name": name, **metrics.summarize(pred, logits_test, labels_test, None),
               "agreement_with_exact": float((pred.argmax(1) == ref.argmax(1)).double().mean()),
               "relative_mse_to_exact": float(((pred - ref) ** 2).sum() / (ref ** 2).sum())}
        if a.get("K_train") is not None and K_exact is not None:
            row["kernel_relative_error"] = metrics.kernel_relative_error(a["K_train"], K_exact)
            row["kernel_alignment"] = metrics.kernel_alignment(a["K_train"], K_exact)
        rows.append(row)
    return rows
