"""Fitting the per-class kernel model and measuring it: the m-sweep of Figure 1 and the rank sweep
of Figure 5. Computation only; the figures are drawn by :mod:`dntk.report`."""

from __future__ import annotations


from .. import metrics
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
