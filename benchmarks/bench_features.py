"""Per-logit projected gradient features for torchvision ResNet-18: dntk vs the common recipe.

Usage:  python benchmarks/bench_features.py [--quick]

For 32×32 and 64×64 inputs, n = 32 ImageNette photos × 10 logits and k ∈ {1024, 4096}, measures
ms per (sample, logit), peak memory above baseline, and the per-class kernel's relative Frobenius
error against the exact eNTK (dntk.empirical_ntk) for:

- the common recipe: torch.func vmap(grad) per logit + a dense Gaussian regenerated in chunks of
  100,000 rows for every batch of 32 (timed on a fraction of the chunks and extrapolated);
- bare per-sample gradients (dntk's hook engine, no projection): the floor for per-logit features;
- every dntk projector. The dense ones (gaussian, rademacher) are timed on a fraction of the
  parameter blocks and extrapolated, like the recipe; identity (k = P, a 14 GB output here) is not
  run — its cost is the bare-gradient row.

Kernel errors of dense Gaussian maps (the recipe and dntk's gaussian/rademacher) are the closed-form
expectation E‖K̂−K‖_F/‖K‖_F = sqrt(Σ_ij (K_ii K_jj + K_ij²)/k)/‖K‖_F, exact for i.i.d. Gaussian
sketches (Rademacher's is at most this); tests/test_projection.py checks the implementations
against it. Sparse/structured errors are measured (mean of 3 seeds).

The model is an untrained ResNet-18 whose BatchNorm statistics are calibrated on real photos (a
trained teacher changes the numbers, not the ranking). Writes benchmarks/results/features.json.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dntk  # noqa: E402
from common import machine, peak_memory, real_images, table, write_json  # noqa: E402
from dntk.features import GradientCapture  # noqa: E402
from dntk.projection import make  # noqa: E402


# --- the common recipe (reference implementation; deliberately not part of the library) ----------
def recipe_gradients(model, x, c):
    """vmap(grad) of logit c over a batch, flattened to [B, P] in sorted-name order."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}

    def f(p, xi):
        return functional_call(model, (p, buffers), (xi.unsqueeze(0),))[0, c]

    g = vmap(grad(f), in_dims=(None, 0))(params, x)
    return torch.cat([g[n].reshape(x.shape[0], -1) for n in sorted(g)], 1)


def recipe_projection_seconds(P, B, k, chunks_timed=2, chunk=100_000):
    """Seconds to project B gradients with the chunk-regenerated dense Gaussian, from timing a few
    chunks (seed = 42·1,000,003 + chunk id, as in the reviewers' scripts) and scaling by P/chunk.
    The recipe is given its best case: the chunk buffer is allocated once and a warm-up chunk is
    not timed."""
    G = torch.randn(B, chunk)
    out = torch.zeros(B, k)
    Q = torch.empty(chunk, k)
    gen = torch.Generator()
    for cid in range(chunks_timed + 1):
        if cid == 1:
            t = time.perf_counter()
        gen.manual_seed(42 * 1_000_003 + cid)
        torch.randn(chunk, k, generator=gen, out=Q)
        out += G @ Q
    per_chunk = (time.perf_counter() - t) / chunks_timed
    return per_chunk * math.ceil(P / chunk)


def dense_projector_seconds(name, P, B, k, rows_timed=400_000):
    """Seconds for dntk's dense projector to project B gradients of P parameters (timed on
    rows_timed parameters and scaled)."""
    p = make(name, k=k, seed=0, cache_bytes=0)
    spec = dntk.projection.BlockSpec("w", rows_timed)
    p.bind([spec])
    block = torch.randn(B, rows_timed)
    out = torch.zeros(B, k)
    t = time.perf_counter()
    p.project("w", block, out)
    return (time.perf_counter() - t) * P / rows_timed


class _Bare:
    """Materialise every per-sample gradient block, project nothing."""

    def block(self, c, name, block):
        pass

    def outer(self, c, name, g, a):
        torch.bmm(g, a.transpose(1, 2))


def rel_err(Kp, K):
    return float(((Kp - K).flatten(1).norm(dim=1) / K.flatten(1).norm(dim=1)).mean())


def gaussian_expected(K, k):
    d = torch.diagonal(K, dim1=1, dim2=2)
    var = (d[:, :, None] * d[:, None, :] + K ** 2).sum((1, 2)) / k
    return float((var.sqrt() / K.flatten(1).norm(dim=1)).mean())


def calibrated_resnet(x):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    model.train()
    with torch.no_grad():
        for i in range(0, x.shape[0], 16):
            model(x[i : i + 16])
    return model.eval()


def run(quick: bool):
    torch.set_num_threads(2)
    sizes = [32] if quick else [32, 64]
    ks = [1024] if quick else [1024, 4096]
    n, C = (8 if quick else 32), 10
    rows = []
    for size in sizes:
        x = real_images(n, size)
        model = calibrated_resnet(x)
        P = sum(p.numel() for p in model.parameters())
        print(f"\n== {size}×{size}, n={n}, C={C}, P={P:,}")
        t = time.perf_counter()
        K = dntk.empirical_ntk(model, x)
        t_exact = time.perf_counter() - t
        print(f"exact per-class eNTK: {t_exact:.1f} s")

        # bare gradients (the floor)
        cap = GradientCapture(model)
        cap.run(x[:2], None, _Bare())
        with peak_memory() as mem:
            t = time.perf_counter()
            cap.run(x, None, _Bare())
            bare = (time.perf_counter() - t) * 1000 / (n * C)
        rows.append(dict(size=size, k=None, method="bare per-sample gradients (floor)", ms=bare, peak_mb=mem["peak_mb"],
                         error=None, timing="measured"))

        # common recipe: gradients measured (a few logits), projection extrapolated
        logits_timed = 2 if quick else 3
        with peak_memory() as mem:
            t = time.perf_counter()
            for c in range(logits_timed):
                recipe_gradients(model, x, c)
            grad_ms = (time.perf_counter() - t) * 1000 / (n * logits_timed)
        recipe_mem = mem["peak_mb"]
        for k in ks:
            proj_ms = recipe_projection_seconds(P, n, k, chunks_timed=1 if quick else 2) * 1000 / n
            rows.append(dict(size=size, k=k, method="common recipe: vmap(grad) + chunked Gaussian", ms=grad_ms + proj_ms,
                             peak_mb=recipe_mem, error=gaussian_expected(K, k),
                             timing=f"gradients measured on {logits_timed} logits; projection extrapolated from "
                                    f"{1 if quick else 2} of {math.ceil(P / 100_000)} chunks; error: closed form"))
            for name in ("gaussian", "rademacher"):
                ms = bare + dense_projector_seconds(name, P, n, k) * 1000 / n
                rows.append(dict(size=size, k=k, method=f"dntk {name}", ms=ms, peak_mb=None,
                                 error=gaussian_expected(K, k),
                                 timing="bare gradients + projection extrapolated from 400k of P rows; error: closed form"))
            for name in ("sjlt", "tensorsketch"):
                p = make(name, k=k, seed=0)
                dntk.gradient_features(model, x[:2], p, progress=False)  # builds hashes once
                with peak_memory() as mem:
                    t = time.perf_counter()
                    r = dntk.gradient_features(model, x, p, progress=False)
                    ms = (time.perf_counter() - t) * 1000 / (n * C)
                errs = [rel_err(r.kernel(), K)]
                for seed in (1, 2):
                    errs.append(rel_err(dntk.gradient_features(model, x, make(name, k=k, seed=seed), progress=False).kernel(), K))
                rows.append(dict(size=size, k=k, method=f"dntk {name}" + (" (default)" if name == dntk.projection.DEFAULT else ""),
                                 ms=ms, peak_mb=mem["peak_mb"], error=sum(errs) / len(errs), error_seeds=errs,
                                 timing="measured"))
        for r in rows:
            if r["size"] == size:
                r.setdefault("exact_ntk_s", t_exact)
        print(table([r for r in rows if r["size"] == size], COLUMNS))
    return rows


COLUMNS = [("size", "input", "{}px"), ("k", "k", "{}"), ("method", "method", ""), ("ms", "ms / (sample, logit)", "{:.2f}"),
           ("peak_mb", "peak MB", "{:.0f}"), ("error", "kernel rel. error", "{:.4f}")]


def summarise(rows):
    out = {}
    for size in sorted({r["size"] for r in rows}):
        bare = next(r for r in rows if r["size"] == size and r["k"] is None)["ms"]
        for k in sorted({r["k"] for r in rows if r["k"]}):
            sel = [r for r in rows if r["size"] == size and r["k"] == k]
            recipe = next(r for r in sel if r["method"].startswith("common"))
            default = next(r for r in sel if r["method"].endswith("(default)"))
            gauss = next(r for r in sel if r["method"] == "dntk gaussian")
            out[f"{size}px_k{k}"] = {
                "default": default["method"],
                "speedup_vs_recipe": recipe["ms"] / default["ms"],
                "cost_vs_bare_gradients": default["ms"] / bare,
                "error_default": default["error"],
                "error_dense_gaussian": gauss["error"],
                "peak_mb_default": default["peak_mb"],
            }
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one size, one k, 8 images: a smoke run")
    args = ap.parse_args()
    rows = run(args.quick)
    summary = summarise(rows)
    print("\nSummary (targets: ≥200× faster than the recipe at k=4096, error ≤ dense Gaussian's, ≤2× bare gradients):")
    for key, s in summary.items():
        print(f"  {key}: {s['default']} is {s['speedup_vs_recipe']:.0f}× faster than the recipe, "
              f"{s['cost_vs_bare_gradients']:.2f}× the bare gradients, error {s['error_default']:.4f} vs "
              f"Gaussian {s['error_dense_gaussian']:.4f}, peak {s['peak_mb_default']:.0f} MB")
    path = write_json("features.json" if not args.quick else "features_quick.json",
                      {"machine": machine(), "rows": rows, "summary": summary,
                       "notes": __doc__.strip().split("\n\n", 2)[1:]})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
