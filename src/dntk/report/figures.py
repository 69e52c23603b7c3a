"""Figures. Plotting only: every number arrives computed (see dntk.pipeline)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = [("fidelity", "test fidelity"), ("accuracy", "test accuracy"), ("mse", "test MSE (vs regression targets)"),
          ("condition_number", "condition number"), ("min_eigenvalue", "min eigenvalue")]


def figure1(curves: dict[str, list[dict]], path, *, teacher_accuracy: float | None = None, title: str = "") -> Path:
    """The paper's Figure 1: kernel-model metrics versus the number of training points m.

    curves: label -> list of rows {"m", "fidelity", "accuracy", "mse", "condition_number",
    "min_eigenvalue"} (one curve per kernel / base model / distiller).
    """
    fig, axes = plt.subplots(1, 5, figsize=(20, 3.8))
    for (key, label), ax in zip(PANELS, axes):
        for name, rows in curves.items():
            ms = [r["m"] for r in rows if r.get(key) is not None]
            vals = [r[key] for r in rows if r.get(key) is not None]
            ax.plot(ms, vals, marker="o", ms=3, label=name)
        if key == "accuracy" and teacher_accuracy is not None:
            ax.axhline(teacher_accuracy, color="k", ls="--", lw=1, label="network")
        if key in ("mse", "condition_number"):
            ax.set_yscale("log")
        if key == "min_eigenvalue":
            ax.set_yscale("symlog", linthresh=1e-8)
        ax.set_xscale("log")
        ax.set_xlabel("training points m (even across classes)")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
