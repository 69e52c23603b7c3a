"""Figures 2–5 of the paper and the grid-search Pareto plot. Plotting only: inputs are computed
spectra, structures and metric rows."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..spectral.summary import SPECTRUM_LABELS  # noqa: E402


def figure2(spectra: dict[str, list], ranks: dict[str, list], path, *, class_names=None, tau_v=0.95) -> Path:
    """Per-class eigenvalue spectra (normalised by the largest) with truncation ranks marked.

    spectra: panel key (titled by ``SPECTRUM_LABELS``, else the key itself) -> list of C eigenvalue arrays
    (descending); ranks: same keys -> C ranks."""
    fig, axes = plt.subplots(1, len(spectra), figsize=(6.5 * len(spectra), 4), squeeze=False)
    for ax, (key, lams) in zip(axes[0], spectra.items()):
        title = SPECTRUM_LABELS.get(key, key)
        if len(lams) > AGGREGATE_ABOVE:
            _aggregate_spectra(ax, lams, ranks[key])
            ax.set_title(f"{title}: {len(lams)} classes, truncation ranks at {tau_v:.0%} variance")
            continue
        cmap = plt.get_cmap("tab10")
        for c, lam in enumerate(lams):
            lam = np.clip(np.asarray(lam, dtype=float), 1e-300, None)
            name = class_names[c] if class_names else str(c)
            ax.semilogy(np.arange(1, len(lam) + 1), lam / lam[0], color=cmap(c % 10), lw=1,
                        label=f"{name} (r={ranks[key][c]})")
            r = ranks[key][c]
            if r and r <= len(lam):
                ax.plot([r], [lam[r - 1] / lam[0]], "o", color=cmap(c % 10), ms=4)
        ax.set_xscale("log")
        ax.set_xlabel("index")
        ax.set_ylabel("eigenvalue / largest")
        ax.set_title(f"{title}: truncation ranks at {tau_v:.0%} variance")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


AGGREGATE_ABOVE = 12   # more classes than this: one aggregate panel instead of one line per class
FIGURE4_CLASSES = 20   # figure4-class<c>.png for at most this many classes (the first ones)


def _aggregate_spectra(ax, lams, ranks) -> None:
    """Median normalised spectrum over classes with its 10–90% band, and the ranks' spread."""
    L = min(len(lam) for lam in lams)
    M = np.stack([np.clip(np.asarray(lam, dtype=float)[:L], 1e-300, None) / max(float(lam[0]), 1e-300)
                  for lam in lams])
    x = np.arange(1, L + 1)
    lo, med, hi = np.percentile(M, [10, 50, 90], axis=0)
    ax.fill_between(x, lo, hi, color="C0", alpha=0.25, label="10–90% of classes")
    ax.semilogy(x, med, color="C0", lw=1.5, label="median over classes")
    r = np.asarray([v for v in ranks if v], dtype=float)
    if r.size:
        for q, style in ((np.percentile(r, 50), "-"), (r.min(), ":"), (r.max(), ":")):
            ax.axvline(q, color="C3", ls=style, lw=1)
        ax.plot([], [], color="C3", label=f"ranks: min {r.min():.0f}, median {np.median(r):.0f}, max {r.max():.0f}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("index")
    ax.set_ylabel("eigenvalue / largest")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def figure3(rows: list[dict], m: int, path) -> Path:
    """Fidelity, accuracy, MSE versus s for every method, and accuracy versus compression m/s.

    rows: {"method", "s", "fidelity", "accuracy", "mse", optional ``"*_std"``}; rows that carry the
    held-out measures of ``dntk.gradient_distillation.unseen_measures`` add a second row of panels: argmax agreement
    with the all-m model on a GP-prior target and on one-hot labels, and the Nyström kernel error —
    fidelity on targets the synthetic set never saw next to fidelity on the ones it was built for."""
    heldout = any("gp_agreement" in r for r in rows)
    fig, axes = plt.subplots(2 if heldout else 1, 4, figsize=(20, 8 if heldout else 4), squeeze=False)
    lower = axes[1] if heldout else None
    axes = axes[0]
    methods = sorted({r["method"] for r in rows}, key=lambda n: (n != "local-global", n))
    for method in methods:
        sel = sorted((r for r in rows if r["method"] == method), key=lambda r: r["s"])
        s = np.array([r["s"] for r in sel], dtype=float)
        style = dict(marker="o", ms=4, lw=2.2 if method == "local-global" else 1.2, label=method)
        for ax, key in zip(axes[:3], ("fidelity", "accuracy", "mse")):
            y = np.array([r[key] for r in sel])
            ax.plot(s, y, **style)
            std = [r.get(f"{key}_std") for r in sel]
            if all(v is not None for v in std):
                ax.fill_between(s, y - np.array(std), y + np.array(std), alpha=0.15)
        axes[3].plot(m / s, [r["accuracy"] for r in sel], **style)
        if heldout:
            for ax, key in zip(lower, ("gp_agreement", "onehot_agreement", "nystrom_error", "posterior_variance_error")):
                ax.plot(s, [r.get(key, np.nan) for r in sel], **style)
    if heldout and any("nystrom_oracle" in r for r in rows):
        # the oracle optimum of the Nyström error at each s (depends on s only): the best any s gradients in the
        # span of the m can do on these test points
        best = {}
        for r in rows:
            if r.get("nystrom_oracle") is not None:
                best[r["s"]] = min(best.get(r["s"], np.inf), r["nystrom_oracle"])
        xs = sorted(best)
        lower[2].plot(xs, [best[x] for x in xs], "k--", lw=1.5, label="optimum (test oracle)")
        lower[2].legend(fontsize=7)
    if heldout:
        for ax, title in zip(lower, ("held out: agreement with all-m, GP-prior target",
                                     "held out: agreement with all-m, one-hot labels", "Nyström kernel error",
                                     "GP posterior-variance error")):
            ax.set_title(title, fontsize=10)
            ax.set_xscale("log")
            ax.grid(alpha=0.3)
            ax.set_xlabel("gradients per class kernel s")
        lower[2].set_yscale("log")
        lower[3].set_yscale("log")
    for ax, title in zip(axes, ("test fidelity (distillation targets)", "test accuracy", "test MSE (logits)",
                                "accuracy vs compression")):
        ax.set_title(title)
        ax.set_xscale("log")
        ax.grid(alpha=0.3)
        ax.set_xlabel("gradients per class kernel s" if title != "accuracy vs compression" else f"compression m/s (m={m})")
    axes[2].set_yscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    axes[3].xaxis.set_minor_formatter(NullFormatter())   # m/s spans < 2 decades: minor labels collide
    axes[3].xaxis.set_major_formatter(ScalarFormatter())
    ticks = sorted({round(r["compression"]) for r in rows if r.get("compression")})
    if 1 < len(ticks) <= 8:
        axes[3].set_xticks(ticks)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def figure4(containment, heatmap, max_align, mean_align, coverage, r_g: int, tau_g: float, path, *,
            title: str = "") -> Path:
    """The three local–global panels for one class: containment (max/mean/min over clusters)
    versus r, the cluster × global-PC variance heat-map, and per-PC alignment with gaps shaded."""
    containment = np.asarray(containment)
    fig, axes = plt.subplots(3, 1, figsize=(8, 10))
    r = np.arange(1, containment.shape[1] + 1)
    ax = axes[0]
    ax.plot(r, containment.max(0), label="max", color="tab:green")
    ax.plot(r, containment.mean(0), label="mean", color="tab:blue")
    ax.plot(r, containment.min(0), label="min", color="tab:orange")
    ax.axvline(r_g, color="k", ls="--", lw=1, label=f"truncation rank {r_g}")
    ax.set_xlabel("global rank r")
    ax.set_ylabel("variance-weighted local\nvectors inside top-r PCs")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    ax = axes[1]
    im = ax.imshow(np.asarray(heatmap), aspect="auto", cmap="magma")
    ax.set_xlabel("global PC j")
    ax.set_ylabel("cluster i")
    ax.set_title("(u^j|I_i)ᵀ K_i (u^j|I_i) / tr K_i", fontsize=9)
    fig.colorbar(im, ax=ax)
    ax = axes[2]
    j = np.arange(1, len(max_align) + 1)
    ax.plot(j, max_align, color="darkred", label="max over clusters")
    ax.plot(j, mean_align, color="purple", label="mean over clusters")
    ax.plot(j, coverage, color="gray", ls=":", label="union coverage")
    for jj, c in zip(j, coverage):
        if c < tau_g:
            ax.axvspan(jj - 0.5, jj + 0.5, color="orange", alpha=0.3, lw=0)
    ax.axhline(tau_g, color="k", ls="--", lw=1, label=f"τ_g = {tau_g}")
    ax.set_xlabel("global PC j")
    ax.set_ylabel("‖P_i(u^j|I_i)‖²")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def figure5(rows: list[dict], path) -> Path:
    """Fidelity, accuracy and MSE versus the rank r of the Woodbury predictor. rows: {"rank", ...}."""
    rows = sorted(rows, key=lambda r: r["rank"])
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    ranks = [r["rank"] for r in rows]
    for ax, key in zip(axes, ("fidelity", "accuracy", "mse")):
        ax.plot(ranks, [r[key] for r in rows], marker="o", ms=3)
        ax.set_xscale("log")
        ax.set_xlabel("rank r")
        ax.set_title(f"test {key}")
        ax.grid(alpha=0.3)
    axes[2].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def pareto_figure(rows: list[dict], front: list[dict], path, *, x: str = "s", y: str = "accuracy") -> Path:
    """Every (τ_v, τ_g, H) configuration and the Pareto frontier (``dntk.gradient_distillation.pareto_front``)."""
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.scatter([r[x] for r in rows], [r[y] for r in rows], s=12, alpha=0.5, label="(τ_v, τ_g, H) configurations")
    ax.plot([r[x] for r in front], [r[y] for r in front], "r-o", ms=4, label="Pareto frontier")
    ax.set_xscale("log")
    ax.set_xlabel("mean gradients per class s")
    ax.set_ylabel(f"test {y}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def class_figure4(row: dict, arrays: dict, tau_g: float, path) -> Path:
    """Figure 4 of one class from a row of :func:`dntk.spectral.local_global_summary` (its JSON
    summary ``row`` and its ``"figure"`` arrays)."""
    return figure4(arrays["containment"], arrays["heatmap"], arrays["max_alignment"], arrays["mean_alignment"],
                   arrays["coverage"], row["r_g"], tau_g, path,
                   title=f"class {row['class']}: r_g={row['r_g']}, {arrays['n_clusters']} clusters, "
                         f"uncovered {row['uncovered_variance_fraction']:.1%} of global variance")


def gradient_stage_figures(stage, out, *, class_names=None, tau_v: float = 0.95, tau_g: float = 0.9) -> list[Path]:
    """Figures 2–5 of stage 3 from a :class:`dntk.pipeline.stage3.GradientStage`: figure2.png,
    figure3.png, figure4-class<c>.png for the first FIGURE4_CLASSES classes, figure5.png in ``out``. With
    more than AGGREGATE_ABOVE classes Figure 2 draws the classes' median spectrum and its spread."""
    out = Path(out)
    paths = [figure2(stage.spectra, stage.summary["ranks"], out / "figure2.png", class_names=class_names, tau_v=tau_v),
             figure3(stage.summary["figure3_rows"], stage.summary["m"], out / "figure3.png")]
    for c, (row, arrays) in enumerate(zip(stage.summary["local_global"], stage.local_global_arrays)):
        if c >= FIGURE4_CLASSES:   # one file per class stops being readable; the rows are all in results.json
            break
        paths.append(class_figure4(row, arrays, tau_g, out / f"figure4-class{c}.png"))
    paths.append(figure5(stage.summary["figure5_rows"], out / "figure5.png"))
    return paths
