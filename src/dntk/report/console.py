"""The console summary ``dntk run`` prints after writing results.json."""

from __future__ import annotations

from ..spectral.summary import ALL_POINTS

# the kernel model's summary in results.json: mse is against the regression targets used (--targets),
# mse_vs_teacher_logits against the teacher's logits (the two agree with --targets logits)
KM_KEYS = ("fidelity", "accuracy", "mse", "mse_vs_teacher_logits", "condition_number", "min_eigenvalue")


def format_results(res) -> str:
    """A table of the kernel model (and the exact eNTK model with --exact), counts and timings, from a
    :class:`dntk.pipeline.RunResult`."""
    km = res.kernel_model
    exact = res.exact
    lines = ["", f"{'':28s}{'projected':>14s}" + (f"{'exact eNTK':>14s}" if exact else "")]
    for key in KM_KEYS:
        if key == "mse_vs_teacher_logits" and res.targets == "logits":
            continue  # identical to mse
        name = {"mse": f"mse (vs {res.targets} targets)", "mse_vs_teacher_logits": "mse vs teacher logits"}.get(key, key)
        row = f"{name:28s}{km[key]:>14.4g}"
        if exact:
            row += f"{exact['kernel_model'][key]:>14.4g}"
        lines.append(row)
    if exact:
        lines.append(f"{'kernel rel. error vs exact':28s}{exact['kernel_relative_error']:>14.4g}")
        lines.append(f"{'kernel alignment vs exact':28s}{exact['kernel_alignment']:>14.4g}")
    c = res.counts
    lines.append(f"teacher test accuracy {res.teacher['test_accuracy']:.4f}; m={c['m']} of {c['n_real']} real, "
                 f"{c['n_test']} test, {c['per_sample_gradients']:,} per-sample gradients, P={c['parameters']:,} → k={c['k']}")
    lines.append("timings (s): " + ", ".join(f"{k}={v:.1f}" for k, v in res.timings_s.items())
                 + f"; peak memory {res.peak_memory_mb:.0f} MB")
    return "\n".join(lines)


def gradient_stage_line(gd: dict) -> str:
    """One line on stage 3: s, m/s, the synthetic model's metrics beside all m, the truncation ranks."""
    km, full = gd["kernel_model"], gd["kernel_model_all_m"]
    ranks = gd["ranks"][ALL_POINTS]
    return (f"gradient distillation ({gd['method']}): s={gd['s']} per class (m/s={gd['compression']:.1f}); "
            f"fidelity {km['fidelity']:.4f}, accuracy {km.get('accuracy', float('nan')):.4f}, mse {km['mse']:.4g} "
            f"(all m: fidelity {full['fidelity']:.4f}); truncation ranks {ranks}")
