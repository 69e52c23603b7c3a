"""The kernel model without holding every feature in memory.

A fitted per-class KRR is linear in the test features: f_c(x) = φ_c(x)ᵀ w_c with

    w_c = Φ_cᵀ α_c / ν_c                       (dual: α_c = (K_c/ν_c + λI)⁻¹ y_c)
    w_c = (Φ_cᵀΦ_c/ν_c + λI)⁻¹ Φ_cᵀ y_c / ν_c    (primal, when k < m)

so predictions need only the weights W [C, k] (float64) and one batch of test features at a time:
memory O(C·k) plus a batch, whatever the number of test inputs. :func:`class_weights` fits one class
at a time from a :class:`~dntk.store.FeatureStore` (reading that class's [m, k] block only, never
[C, m, k]); :func:`streamed_predictions` computes the test features batch by batch and keeps only
the predictions.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .. import metrics
from .krr import PerClassKRR


def class_weights(train, targets: torch.Tensor, m_values, *, ridge: float, normalize: str | None = "trace",
                  conditioning_max_m: int = 4096, device=None) -> tuple[dict, dict]:
    """Weights of the per-class KRR fitted on the first m training points, for every m in ``m_values``.

    train: a FeatureStore (read class by class) or a FeatureResult / tensor [C, m, k]; targets [m, C].
    Returns ({m: W float64 [C, k]}, {m: {"condition_number", "min_eigenvalue"}}) — the conditioning of
    the trace-normalised training kernel averaged over classes, as :func:`dntk.metrics.kernel_conditioning`
    (None above ``conditioning_max_m`` points, where the m×m eigendecomposition is not affordable)."""
    m_values = sorted(m_values)
    m_max = m_values[-1]
    C = targets.shape[1]
    weights = {m: [] for m in m_values}
    cond = {m: [] for m in m_values}
    for c in range(C):
        if hasattr(train, "read_class"):
            block = train.read_class(c, 0, m_max)
        else:
            block = (train.features if hasattr(train, "features") else train)[c, :m_max]
        for m in m_values:
            phi = block[:m]
            model = PerClassKRR(ridge=ridge, normalize=normalize, device=device).fit([phi], targets[:m, c:c + 1])
            weights[m].append(model.weights()[0])
            if m <= conditioning_max_m:
                cond[m].append(metrics.kernel_conditioning(model.train_kernel(0)[None], normalize=normalize))
    W = {m: torch.stack(ws) for m, ws in weights.items()}
    out = {}
    for m, rows in cond.items():
        out[m] = ({"condition_number": sum(r["condition_number"] for r in rows) / C,
                   "min_eigenvalue": sum(r["min_eigenvalue"] for r in rows) / C} if rows else
                  {"condition_number": None, "min_eigenvalue": None})
    return W, out


def predict_with_weights(features: torch.Tensor, weights: dict) -> dict:
    """{m: predictions float64 [B, C]} of test features [C, B, k] under each weight set W [C, k]."""
    f = features.double()
    return {m: torch.einsum("cbk,ck->bc", f, W.to(f.device)).cpu() for m, W in weights.items()}


def predict_shards(model, X: torch.Tensor, projector, weights: dict, folder, *, shard: int = 1024,
                   batch_size: int = 32, device=None, progress: bool = True, rank: int = 0, world: int = 1) -> None:
    """Predictions of the weight sets on X [n, ...], shard by shard (shard i on rank i mod world): the
    test features of one shard are computed, multiplied by every W and dropped; the shard's
    predictions {m: [len, C]}, logits [len, C] and labels are saved atomically in ``folder`` (the
    folder's name should carry a digest of the model, projector, weights and inputs), so an
    interrupted run resumes. Memory: one shard's features plus O(C·k) per weight set."""
    from ..features import gradient_features
    from ..store import cached

    folder = Path(folder)
    from .. import samples

    n = samples.count(X)
    for i, start in enumerate(range(0, n, shard)):
        if i % world != rank:
            continue
        stop = min(n, start + shard)

        def compute(start=start, stop=stop):
            r = gradient_features(model, samples.take(X, slice(start, stop)), projector, batch_size=batch_size, device=device,
                                  progress=progress)
            return {"predictions": predict_with_weights(r.features, weights), "logits": r.logits,
                    "paths": r.path_shares()}

        cached(folder / f"predictions-{start:09d}-{stop:09d}.pt", compute)


def gather_predictions(folder, n: int, shard: int = 1024) -> dict:
    """The shards of :func:`predict_shards` in order: {"predictions": {m: [n, C]}, "logits": [n, C],
    "paths": engine path shares}. Raises a DNTKError naming a missing shard."""
    from ..errors import DNTKError
    from ..store import load

    parts = []
    for start in range(0, n, shard):
        path = Path(folder) / f"predictions-{start:09d}-{min(n, start + shard):09d}.pt"
        if not path.exists():
            raise DNTKError(f"{path} is missing: a process of the streamed evaluation did not finish; rerun")
        parts.append(load(path))
    return {"predictions": {m: torch.cat([p["predictions"][m] for p in parts]) for m in parts[0]["predictions"]},
            "logits": torch.cat([p["logits"] for p in parts]), "paths": parts[0]["paths"]}


def curve_from_predictions(predictions: dict, conditioning: dict, logits_test, labels_test, targets_test=None) -> list:
    """Rows {m, summary metrics, condition_number, min_eigenvalue} as :func:`dntk.kernels.krr_curve` makes
    them, from streamed predictions {m: [n, C]} and :func:`class_weights`' conditioning."""
    return [{"m": m, **metrics.summarize(predictions[m], logits_test, labels_test, targets_test), **conditioning[m]}
            for m in sorted(predictions)]
