"""The diagnostics ``dntk reproduce`` adds to its two runs: the paper's theory (Proposition 3.6 /
Theorem 3.3) per subspace, and DNTK against the exact eNTK on a subset small enough for it. Each
gathers its inputs (subsets, features through the run's stores) and hands the numbers to
:mod:`dntk.spectral` and :mod:`dntk.kernels`; nothing is solved here."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from ..data import balanced_indices
from ..features import sliced_class_kernels
from ..gradient_distillation import distill_gradients
from ..kernels import PerClassKRR, compare_with_exact, shared_normalisation
from ..spectral import second_moment_spectrum, subspace_diagnostics
from ..store import cached, digest
from .stage1 import training_points
from .stage3 import FIG3_COMPRESSIONS


def theory_diagnostics(rc, cfg, train_set, points, X_test, y_test, model, features) -> dict:
    """Proposition 3.6 / Theorem 3.3 per subspace (WMDD, random, k-center, top PCA), averaged over logits."""
    from ..config import DistillConfig

    subsets = {"wmdd": (points.images, points.labels)}
    used = set()
    for method in ("random", "kcenter"):
        d = DistillConfig(method=method, ipc=cfg.distill.ipc)
        p = training_points(d, cfg.kernel.m, train_set, teacher=model, seed=cfg.seed, out_dir=Path(cfg.out),
                            device=cfg.device, progress=False)
        subsets[method] = (p.images, p.labels)
        used |= set(p.manifest.get("indices", []) if p.manifest else [])
    # Σ_g from real training images in none of the subsets (a seeded balanced draw)
    n_sigma = rc.extra("theory_images")
    gen = torch.Generator().manual_seed(rc.seed + 1)
    order = torch.randperm(len(train_set), generator=gen)
    free = torch.tensor([int(i) for i in order if int(i) not in used])
    pick = free[balanced_indices(train_set.labels[free], min(n_sigma, len(free)), train_set.num_classes)]
    X_sigma, _ = train_set.tensors(pick)
    # the linear algebra (eigendecompositions of k × k / n × n second moments, SVDs, in float64) runs where the
    # run does: on a GPU it is seconds, on 2 CPU cores minutes
    dev = torch.device(cfg.device)
    F_sigma = features(X_sigma, "theory").features.to(dev, torch.float64)
    F_test = features(X_test, "run", "test").features.to(dev, torch.float64)
    F_sub = {name: features(X, "run" if name == "wmdd" else "theory").features.to(dev, torch.float64)
             for name, (X, _) in subsets.items()}
    y_test = y_test.to(dev)
    subsets = {name: (X, labels.to(dev)) for name, (X, labels) in subsets.items()}
    C = F_sigma.shape[0]
    rows = {name: [] for name in list(subsets) + ["pca"]}
    for c in range(C):
        lam = second_moment_spectrum(F_sigma[c])
        for name, (X, labels) in subsets.items():
            rows[name].append(subspace_diagnostics(F_sigma[c], F_test[c], F_sub[name][c], labels_heldout=y_test,
                                                   labels_V=labels, spectrum=lam))
        d = max(r["dim"] for name in subsets for r in rows[name][-1:])
        rows["pca"].append(subspace_diagnostics(F_sigma[c], F_test[c], None, labels_heldout=y_test, pca_dim=d,
                                                spectrum=lam))
    summary = {}
    for name, per in rows.items():
        keys = [k_ for k_ in per[0] if per[0][k_] is not None]
        summary[name] = {k_: sum(r[k_] for r in per) / len(per) for k_ in keys}
        summary[name]["per_logit"] = per
    k = F_sigma.shape[-1]
    d = summary["wmdd"]["dim"]
    return {"sigma_images": int(len(pick)), "heldout_images": int(len(X_test)), "subspaces": summary, "k": k,
            "projection_factor": 1 - d / k,
            "projection_note": f"measured on the projected features (k = {k}): a gradient's part outside a "
                               f"d-dimensional V keeps ≈ (1 − d/k) = {1 - d / k:.3f} of its energy outside the projected "
                               "V, so residuals read about that factor of the unprojected ones; the decomposition "
                               "itself is exact in the projected space"}


def exact_subset(rc, cfg, points, test_set, model, checksum, out: Path, features) -> dict:
    """Exact eNTK model vs projections and Algorithm 1 on exact_train distilled + exact_test val images."""
    C = test_set.num_classes
    m_sub = rc.extra("exact_train")
    tr = balanced_indices(points.labels, min(m_sub, len(points)), C)
    te = balanced_indices(test_set.labels, min(rc.extra("exact_test"), len(test_set)), C)
    X_tr = points.images[tr]
    X_te, y_te = test_set.tensors(te)
    X = torch.cat([X_tr, X_te]).to(cfg.device)
    n_tr = len(X_tr)
    path = out / f"exact-subset-{digest(checksum, digest(X))}.pt"
    t = time.perf_counter()
    blob = cached(path, lambda: dict(zip(("K", "info"), sliced_class_kernels(
        model, X, memory_budget_bytes=rc.exact_memory_bytes, progress=rc.progress))))
    K, info = blob["K"], blob["info"]
    with torch.no_grad():
        logits_tr = torch.cat([model(X_tr[i:i + 64].to(cfg.device)).cpu() for i in range(0, n_tr, 64)]).double()
        logits_te = torch.cat([model(X_te[i:i + 64].to(cfg.device)).cpu() for i in range(0, len(X_te), 64)]).double()
    K_tr, K_te = K[:, :n_tr, :n_tr], K[:, n_tr:, :n_tr]
    ridge = cfg.kernel.ridge
    pred_exact = PerClassKRR(ridge=ridge, normalize="trace").fit_kernel(K_tr, logits_tr).predict_kernel(K_te)
    approx = {}
    feats = {}
    for kk in rc.extra("exact_ks"):
        ftr, fte = features(X_tr, "exact", "train", kk), features(X_te, "exact", "test", kk)
        feats[kk] = (ftr, fte)
        pred = PerClassKRR(ridge=ridge, normalize="trace").fit(ftr, logits_tr).predict(fte)
        approx[f"{cfg.features.projector} k={kk}"] = {"pred": pred, "K_train": ftr.kernel()}
    kmax = max(feats)
    F, Ft, _ = shared_normalisation(*feats[kmax])
    for r in FIG3_COMPRESSIONS:
        s = max(1, round(n_tr / r))
        g = cfg.gradients
        dg = distill_gradients("local-global", F.features, logits_tr, budget=s, seed=cfg.seed, tau_v=g.tau_v,
                               tau_g=g.tau_g, n_clusters=min(g.clusters, n_tr), mode=g.mode)
        pred = PerClassKRR(ridge=ridge, normalize=None).fit(dg.features, dg.targets).predict(Ft.features)
        approx[f"{cfg.features.projector} k={kmax} + Algorithm 1 s={s} ({n_tr // s}×)"] = {"pred": pred}
    rows = compare_with_exact(pred_exact, logits_te, y_te, approx, K_exact=K_tr)
    return {"n_train": n_tr, "n_test": len(X_te), "exact": {k_: v for k_, v in info.items()},
            "seconds_including_cached": time.perf_counter() - t, "rows": rows}
