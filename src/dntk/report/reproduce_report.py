"""``report.md`` of ``dntk reproduce``: formatting only — every number arrives in the summary dict
(:func:`dntk.pipeline.reproduce.reproduce`), every figure is already drawn in the report folder."""

from __future__ import annotations

from pathlib import Path

from ..store import atomic_write_text


def _f(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 1e5 or (0 < abs(v) < 1e-3):
            return f"{v:.3g}"
        return f"{v:.{digits}f}"
    return str(v)


def _bytes(n) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} EB"


def _seconds(s) -> str:
    if s is None:
        return "–"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    if s < 3 * 86400:
        return f"{s / 3600:.1f} h"
    return f"{s / 86400:.1f} days"


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines + [""]


def write_reproduce_report(summary: dict, folder) -> Path:
    """Write ``folder/report.md`` from the reproduce summary; returns its path."""
    folder = Path(folder)
    L: list[str] = []
    st = summary["settings"]
    tb, sb = summary["teacher_base"], summary["student_base"]
    L += [f"# dntk reproduce — setting `{summary['setting']}`", "",
          "Written by `dntk reproduce`; every number below comes from `reproduce.json` beside this file's run "
          "folder. Paper numbers are from the reconstruction in `shared/research/paper.md` (§4).", ""]
    L += ["## Settings, ours beside the paper's", ""]
    L += _table(["", "ours", "paper"], [
        ["images", f"{st['image_size']} px" + (f" (resize {st['resize']} → crop)" if st.get("resize") else
                                              " (resize + centre crop)"), "160 px (Resize 176 → CenterCrop 160)"],
        ["network", f"{st['model']}, {st['stem']} stem, P = {summary['costs']['parameters']:,}", "ResNet-18"],
        ["teacher", f"{st['epochs']} epochs, test accuracy {tb['teacher_accuracy']:.4f}", "pretrained, accuracy not stated"],
        ["stage 1", f"{st['distill']} IPC {st['ipc']}, {st['wmdd_iterations']} iterations, lr {st['wmdd_lr']}",
         "WMDD IPC 50 (m = 500)"],
        ["distilled-data base model", f"student, {st['student_protocol']} protocol, {st['student_epochs']} epochs, "
                                      f"test accuracy {sb['base_model']['test_accuracy']:.4f}", "trained on distilled data"],
        ["projection", f"{tb['projector']['name']} k = {tb['projector']['k']}", "random projection"],
        ["test images", f"{tb['counts']['n_test']:,}", "3,925 (reproduction)"],
        ["device", summary["device"] + (f" ({summary['cuda']})" if summary.get("cuda") else ""), "GPU"],
    ])
    L += ["## The paper's five claims", ""]
    L += _table(["claim", "ours", "rule", "holds"],
                [[c["claim"], c["ours"], c["rule"], f"**{c['holds']}**"] for c in summary["claims"]])
    so = summary.get("spectral_optimum")
    if so:
        how = ("Both methods are deterministic (std 0 over the seeds), so each row compares exact values"
               if so["deterministic"] else "Welch's t over the seeds where a side varies")
        L += ["### Beside claim (iii): Algorithm 1 against the spectral optimum", "",
              "`eigen`: per class, s synthetic gradients Φ_cᵀu for the top-s eigenvectors u of the class kernel "
              "(the Eckart–Young optimum of the training kernel; on the test points not guaranteed optimal, hence the "
              f"Nyström oracle). The m are the run's {st['distill']} points (IPC {st['ipc']}). {how}.", "",
              f"**{so['verdict'][0].upper() + so['verdict'][1:]}.** {so['advice']}", ""]
        L += _table(["s", "measures Algorithm 1 better", "eigen better", "tie"],
                    [[s, w["local-global"], w["eigen"], w["tie"]] for s, w in so["wins"].items()])
        L += _table(["s", "measure", "Algorithm 1", "eigen", "t", "p", "better"],
                    [[w["s"], w["metric"], _f(w["local-global"]), _f(w["eigen"]),
                      "–" if w["t"] != w["t"] else f"{w['t']:.2f}", "–" if w["p"] != w["p"] else f"{w['p']:.2g}",
                      w["better"]] for w in so["rows"]])

    L += ["## Figure 1 — two base models on the distilled points", "", "![Figure 1](figure1.png)", ""]
    rows = []
    for name, curve in (("teacher (pretrained)", summary["figure1"]["teacher"]), ("student (distilled data)",
                                                                                  summary["figure1"]["student"])):
        if curve:
            r = curve[-1]
            rows.append([name, r["m"], _f(r["fidelity"]), _f(r["accuracy"]), _f(r["mse_vs_teacher_logits"]),
                         _f(r["condition_number"], 1)])
    L += _table(["base model", "m", "fidelity", "accuracy", "logit MSE", "condition number"], rows)

    L += ["## Figures 2–5 — spectra, budgets, local–global structure, rank", ""]
    for i, what in ((2, "class-kernel spectra"), (3, "gradient budgets: Algorithm 1 and the selection baselines"),
                    (4, "local–global composition"), (5, "rank of the Woodbury predictor")):
        if (folder / f"figure{i}.png").exists():
            L += [f"![Figure {i}: {what}](figure{i}.png)", ""]
    L += ["### Algorithm 1 and the baselines at 20×, 50×, 100× gradient compression (teacher base model)", ""]
    L += _table(["target m/s", "s (actual m/s)", "method", "fidelity", "accuracy", "logit MSE", "one-hot refit acc.",
                 "GP agreement", "Nyström err. (test)", "oracle", "fraction of the achievable"],
                [[f"{r['target_compression']}×", f"{r['s']} ({r['compression']:.0f}×)", r["method"], _f(r["fidelity"]),
                  _f(r["accuracy"]), _f(r.get("mse_vs_teacher_logits")), _f(r.get("onehot_accuracy")),
                  _f(r.get("gp_agreement")), _f(r.get("nystrom_error")), _f(r.get("nystrom_oracle")),
                  _f(r.get("nystrom_fraction"))] for r in summary["algorithm1"]])

    ex = summary.get("exact")
    if ex:
        L += [f"## DNTK against the exact eNTK ({ex['n_train']} distilled + {ex['n_test']} validation images)", "",
              f"Exact per-class eNTK by parameter slices ({ex['exact']['groups']} slices, "
              f"{ex['exact']['passes']} gradient passes, P = {ex['exact']['parameters']:,}). Metrics of each kernel "
              "model against the network (fidelity, accuracy) and against the exact eNTK model (agreement, "
              "relative MSE); kernel error of the raw training kernel.", ""]
        L += _table(["model", "kernel rel. error", "alignment", "agreement with exact", "rel. MSE to exact",
                     "fidelity", "accuracy"],
                    [[r["name"], _f(r.get("kernel_relative_error")), _f(r.get("kernel_alignment")),
                      _f(r["agreement_with_exact"]), _f(r["relative_mse_to_exact"]), _f(r["fidelity"]),
                      _f(r["accuracy"])] for r in ex["rows"]])

    th = summary.get("theory")
    if th:
        L += ["## Theory diagnostics (Proposition 3.6, Theorem 3.3)", "",
              f"Σ_g from {th['sigma_images']:,} real training images outside every subset; Theorem 3.3 on the "
              f"{th['heldout_images']:,} held-out validation images. Fractions of tr Σ_g, averaged over logits. "
              "Tasks: a class's mean gradient; the distilled step: the mean of that class's training-point "
              "gradients (η = 1/L). The PCA row's subspace is fitted on the Σ_g sample, so its held-out terms are "
              "out of sample. " + (th.get("projection_note", "").capitalize() + "." if th.get("projection_note") else ""),
              ""]
        L += _table(["subspace", "dim", "residual", "PCA tail", "misalignment gap", "held-out residual",
                     "task residual", "task misalignment"],
                    [[name, _f(v["dim"], 0), _f(v["residual"]), _f(v["pca_tail"]), _f(v["gap"]),
                      _f(v["heldout_residual"]), _f(v["task_residual"]), _f(v.get("task_misalignment"))]
                     for name, v in th["subspaces"].items()])

    co = summary["costs"]
    L += ["## Cost of every stage", "",
          f"FLOPs from `{co['flops_counter']}`: forward {co['model_flops']['forward']:.3g}, one logit's backward "
          f"{co['model_flops']['backward_one_logit']:.3g} per image. Wall time and peak RSS (the stage's own Linux "
          "VmHWM window) are those of the invocation that computed the stage (`cost-ledger.json` keeps the longest "
          "one of each stage; a stage resumed half-way shows its longer part).", ""]
    L += _table(["stage", "per-logit Jacobians", "FLOPs", "how", "bytes stored", "wall time", "peak RSS",
                 "peak GPU"],
                [[s["stage"] + (f" ({s['note']})" if s.get("note") else ""), _f(s["jacobians"]), _f(s["flops"]),
                  s["flops_how"], _bytes(s["bytes"]), _seconds(s["seconds"]),
                  "–" if s["peak_rss_mb"] is None else f"{s['peak_rss_mb']:,.0f} MB",
                  "–" if s.get("peak_gpu_mb") is None else f"{s['peak_gpu_mb']:,.0f} MB"] for s in co["stages"]])
    full = co.get("exact_full")
    if full:
        mo = full["measured_on"]
        L += ["### The uncompressed exact eNTK, extrapolated", "",
              f"All {full['n_train']:,} training × {full['n_test']:,} test images, C = {full['classes']}, "
              f"P = {full['parameters']:,}. Unit costs measured on the exact subset ({mo['images']} images): "
              f"{mo['seconds_per_gradient'] * 1e3:.2f} ms per materialised per-logit gradient, "
              f"{mo['contraction_flops_per_second'] / 1e9:.1f} GFLOP/s contraction.", "",
              "    J = (n_train + n_test)·C;  bytes = J·P·4;",
              "    FLOPs = (n_train + n_test)·(forward + C·backward) + 2·P·C·(n_train² + n_train·n_test)",
              "    time = J · s_per_gradient + contraction FLOPs / measured rate", ""]
        L += _table(["quantity", "exact eNTK"], [
            ["per-logit Jacobians", _f(full["per_logit_jacobians"])], ["Jacobian bytes", _bytes(full["jacobian_bytes"])],
            ["FLOPs", _f(full["flops"])], ["time on this device", _seconds(full["seconds"])],
            ["kernel bytes (float64)", _bytes(full["kernel_bytes"])]])
    L += ["### Reduction factors", "", f"Both sides on all {co.get('n_test_all', '–'):,} test images (this run evaluated "
          f"{co.get('n_test_run', '–'):,}; the DNTK side at the full test split follows the stage formulas above).", ""]
    labels = co.get("reduction_labels") or {}
    L += _table(["compression", "factor"], [[labels.get(k, k), f"{v:,.1f}×"] for k, v in co["reductions"].items()])
    path = folder / "report.md"
    atomic_write_text("\n".join(L) + "\n", path)
    return path


def docs_summary(summary: dict, probe: dict | None = None) -> str:
    """The docs' digest of a reproduce run (the ``reproduce-table`` block of docs/benchmarks.md, rendered by
    benchmarks/render.py): the claims, DNTK against the exact eNTK, the theory diagnostics, the cost of every
    stage with the reduction factors, and — given ``probe`` (``probe-<setting>.json``) — the probed setting's
    cost. Formatting only, like :func:`write_reproduce_report`; ``report.md`` has everything."""
    st, tb = summary["settings"], summary["teacher_base"]
    L = [f"| the paper's claim | ours ({st['image_size']} px, teacher {tb['teacher_accuracy']:.1%}, {st['distill'].upper()} "
         f"IPC {st['ipc']}, {tb['counts']['n_test']:,} test images) | holds |", "|---|---|---|"]
    L += [f"| {c['claim']} | {c['ours']} | {c['holds']} |" for c in summary["claims"]] + [""]
    co = summary["costs"]
    labels = co.get("reduction_labels") or {}
    L += ["Reduction factors (`costs[\"reductions\"]`): " + "; ".join(
        f"{labels.get(k, k)} **{v:,.0f}×**" for k, v in co["reductions"].items()) + ".", ""]
    ex = summary.get("exact")
    if ex:
        L += [f"DNTK against the exact eNTK on {ex['n_train']} {st['distill'].upper()} images + {ex['n_test']} validation "
              f"images (exact per-class eNTK of P = {ex['exact']['parameters']:,} by {ex['exact']['groups']} parameter slices):", ""]
        L += _table(["model", "kernel rel. error", "agreement with the exact model", "fidelity", "accuracy"],
                    [[r["name"], _f(r.get("kernel_relative_error"), 3), _f(r["agreement_with_exact"], 3),
                      _f(r["fidelity"], 3), _f(r["accuracy"], 3)] for r in ex["rows"]])
    th = summary.get("theory")
    if th:
        L += [f"Proposition 3.6 / Theorem 3.3 (fractions of tr Σ_g, Σ_g from {th['sigma_images']:,} real train images; "
              "held-out: the validation images):", ""]
        L += _table(["subspace", "dim", "residual", "PCA tail", "misalignment gap", "held-out residual", "task misalignment"],
                    [[name, _f(v["dim"], 0), _f(v["residual"]), _f(v["pca_tail"]), _f(v["gap"]),
                      _f(v["heldout_residual"]), _f(v.get("task_misalignment"))] for name, v in th["subspaces"].items()])
    L += [f"Cost per stage (FLOPs from `{co['flops_counter']}`; wall time on {st.get('threads') or 'the default'} threads):", ""]
    rows = [[s["stage"] + (f" ({s['note']})" if s.get("note") else ""), _f(s["jacobians"]), _f(s["flops"]),
             _seconds(s["seconds"]), "–" if s["peak_rss_mb"] is None else f"{s['peak_rss_mb'] / 1000:.1f} GB"]
            for s in co["stages"]]
    full = co.get("exact_full")
    if full:
        rows.append([f"**exact eNTK, all {full['n_train']:,} train × {full['n_test']:,} test (extrapolated)**",
                     f"{_f(full['per_logit_jacobians'])} ({_bytes(full['jacobian_bytes'])})", _f(full["flops"]),
                     _seconds(full["seconds"]), "–"])
    L += _table(["stage", "per-logit Jacobians", "FLOPs", "wall time", "peak RSS"], rows)
    if probe:
        parts = "; ".join(f"{s['stage']} {_seconds(s['seconds'])}" for s in probe["stages"])
        ef = probe.get("exact_full") or {}
        L += [f"The `{probe['setting']}` setting on this machine (`--probe {probe['images_measured']}`, extrapolated): "
              f"{_seconds(probe['total_seconds'])} in all ({parts}); the exact eNTK of every image "
              f"{_seconds(ef.get('seconds'))} and {_bytes(ef.get('jacobian_bytes'))} of Jacobians.", ""]
    return "\n".join(L).rstrip("\n")


def write_probe_report(probe: dict, path) -> Path:
    """A markdown table of :func:`dntk.pipeline.reproduce.probe`'s extrapolated stage costs."""
    L = [f"# `{probe['setting']}` measured on {probe['images_measured']} images on {probe['device']}, extrapolated", "",
         f"P = {probe['parameters']:,}, k = {probe['k']}; per image: training step "
         f"{probe['seconds_per_image']['train_step']:.3f} s, pixel step {probe['seconds_per_image']['pixel_step']:.3f} s, "
         f"projected features {probe['seconds_per_image']['projected_features']:.3f} s; exact per-logit gradient "
         f"{probe['seconds_per_exact_gradient'] * 1e3:.1f} ms; contraction {probe['contraction_flops_per_second'] / 1e9:.1f} GFLOP/s.", ""]
    L += _table(["stage", "units", "FLOPs", "time"],
                [[s["stage"], s["units"], _f(s["flops"]), _seconds(s["seconds"])] for s in probe["stages"]])
    L += [f"Total: {_seconds(probe['total_seconds'])}. The exact eNTK of all images: "
          f"{_bytes(probe['exact_full']['jacobian_bytes'])} of Jacobians, {_seconds(probe['exact_full']['seconds'])}.",
          "", "Not listed: the kernel model, stage 3 and the theory's eigendecompositions, which depend on m, k and "
          "the number of test images but not on the image size (their cost is in the run report of the same m).",
          "Unit costs are from a few timed repetitions (after one warm-up) on this device; the WMDD step is counted as "
          "one forward and backward to the pixels per image (its barycenter and BatchNorm terms are not timed).", ""]
    path = Path(path)
    atomic_write_text("\n".join(L) + "\n", path)
    return path
