"""Per-logit projected gradient features for torchvision ResNet-18: dntk vs the common recipe.

Usage:  python benchmarks/bench_features.py [--quick] [--dense-seeds N]

For 32×32 and 64×64 inputs, n = 32 ImageNette photos × 10 logits and k ∈ {1024, 4096}, measures
ms per (sample, logit), peak memory above baseline, and the per-class kernel's relative Frobenius
error against the exact eNTK (dntk.empirical_ntk) for:

- the common recipe: torch.func vmap(grad) per logit + a dense Gaussian regenerated in chunks of
  100,000 rows for every batch of 32 (timed on a fraction of the chunks and extrapolated);
- bare per-sample gradients (dntk's per-call engine, no projection): the floor for per-logit features;
- every dntk projector. The dense ones (gaussian, rademacher) are timed on a fraction of the
  parameter blocks and extrapolated, like the recipe; identity (k = P, a 14 GB output here) is not
  run — its cost is the bare-gradient row.

Kernel errors. Sparse/structured sketches (sjlt, tensorsketch): measured, mean over seeds 0, 1, 2.
The dense Gaussian (dntk's ``gaussian`` projector): *measured* on the same points and the same
seeds (``--dense-seeds``, default 0, 1, 2; the quick run uses seed 0 only), not taken from a formula:
the exact per-sample gradients are computed blockwise — the parameter blocks are split into groups
of ≤ 2M parameters, and for each group one pass of the per-call engine materialises that group's
per-sample, per-logit gradients [C·n, numel] — and dntk's own gaussian map (the very S that
``gradient_features(model, x, make("gaussian", k, seed))`` applies, regenerated chunk by chunk from
the seed) is applied to each block; the features are summed over blocks. A self-check on a small
CNN asserts this equals ``gradient_features`` with the gaussian projector. Cost per (size, k,
seed): P·k random numbers plus 2·C·n·P·k flops — about 3 min at k = 1024 and 12 min at k = 4096 on
2 cores, which is why this row's *time* is still extrapolated. The closed-form expectation
E‖K̂−K‖_F/‖K‖_F ≈ sqrt(Σ_ij (K_ii K_jj + K_ij²)/k)/‖K‖_F is reported beside it
(``error_closed_form``). The recipe's and rademacher's errors are that closed form (marked "closed
form" in the table): the recipe's map is another i.i.d. Gaussian, Rademacher's variance is at most
the Gaussian's.

The model is an untrained ResNet-18 whose BatchNorm statistics are calibrated on real photos (a
trained teacher changes the numbers, not the ranking). Writes benchmarks/results/features.json
(features_quick.json with --quick).
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
from dntk.metrics import kernel_relative_error  # noqa: E402
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

    def outer(self, c, name, g, a, fixed_a=True):
        torch.bmm(g, a.transpose(1, 2))


class _GroupSink:
    """Keeps the materialised per-sample gradient blocks [B, numel] of the named parameters only
    (tied uses summed), for every logit."""

    def __init__(self, names):
        self.names = set(names)
        self.blocks: dict[tuple[int, str], torch.Tensor] = {}

    def _add(self, c, name, block):
        if name not in self.names:
            return
        key = (c, name)
        self.blocks[key] = self.blocks[key] + block if key in self.blocks else block

    def block(self, c, name, block):
        self._add(c, name, block.detach())

    def outer(self, c, name, g, a, fixed_a=True):
        if name in self.names:
            self._add(c, name, torch.bmm(g, a.transpose(1, 2)).reshape(g.shape[0], -1))


def dense_gaussian_kernels(model, x, ks, seeds, group_numel=2_000_000) -> dict:
    """{(k, seed): per-class kernels [C, n, n]} of dntk's gaussian projector (k, seed) applied to the
    exact per-sample, per-logit gradients of x, computed group by group of parameter blocks (one
    engine pass per group of ≤ group_numel parameters), so that each (k, seed) generates its P·k
    random numbers once instead of once per (batch, logit)."""
    cap = GradientCapture(model)
    projs = {(k, s): make("gaussian", k=k, seed=s).bind(cap.specs) for k in ks for s in seeds}
    groups, cur, size = [], [], 0
    for spec in cap.specs:
        if cur and size + spec.numel > group_numel:
            groups.append(cur)
            cur, size = [], 0
        cur.append(spec)
        size += spec.numel
    groups.append(cur)
    n = x.shape[0]
    feats, C = {}, None
    for group in groups:
        sink = _GroupSink(s.name for s in group)
        logits = cap.run(x, None, sink)
        C = logits.shape[1]
        for spec in group:
            ref = next((b for (c, name), b in sink.blocks.items() if name == spec.name), None)
            if ref is None:
                continue
            G = torch.stack([sink.blocks.get((c, spec.name), torch.zeros_like(ref)) for c in range(C)])
            G = G.reshape(C * n, spec.numel)
            for key, p in projs.items():
                out = feats.setdefault(key, torch.zeros(C * n, key[0], dtype=G.dtype))
                p.project(spec.name, G, out)
            for c in range(C):
                sink.blocks.pop((c, spec.name), None)
            del G
    return {key: (lambda F: F @ F.transpose(1, 2))(f.reshape(C, n, key[0]).double()) for key, f in feats.items()}


def check_dense_path():
    """The blockwise dense-Gaussian measurement equals gradient_features with dntk's gaussian."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3, stride=2, padding=1), torch.nn.ReLU(),
                                torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten(), torch.nn.Linear(32, 5)).eval()
    x = torch.randn(6, 3, 8, 8)
    got = dense_gaussian_kernels(model, x, [64], [1], group_numel=700)  # several groups
    ref = dntk.gradient_features(model, x, make("gaussian", k=64, seed=1), progress=False).kernel()
    err = kernel_relative_error(got[(64, 1)], ref)
    if err > 1e-5:
        raise SystemExit(f"self-check failed: blockwise dense Gaussian differs from gradient_features by {err:.2e}")


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


def run(quick: bool, dense_seeds: list[int]):
    torch.set_num_threads(2)
    check_dense_path()
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
        t = time.perf_counter()
        dense = dense_gaussian_kernels(model, x, ks, dense_seeds)
        print(f"dense Gaussian kernels measured (k {ks}, seeds {dense_seeds}): {time.perf_counter() - t:.0f} s")
        for k in ks:
            closed = gaussian_expected(K, k)
            proj_ms = recipe_projection_seconds(P, n, k, chunks_timed=1 if quick else 2) * 1000 / n
            rows.append(dict(size=size, k=k, method="common recipe: vmap(grad) + chunked Gaussian", ms=grad_ms + proj_ms,
                             peak_mb=recipe_mem, error=closed, error_closed_form=closed, error_source="closed form",
                             timing=f"gradients measured on {logits_timed} logits; projection extrapolated from "
                                    f"{1 if quick else 2} of {math.ceil(P / 100_000)} chunks; error: closed form"))
            for name in ("gaussian", "rademacher"):
                ms = bare + dense_projector_seconds(name, P, n, k) * 1000 / n
                row = dict(size=size, k=k, method=f"dntk {name}", ms=ms, peak_mb=None, error=closed,
                           error_closed_form=closed, error_source="closed form",
                           timing="bare gradients + projection extrapolated from 400k of P rows; error: closed form")
                if name == "gaussian":
                    errs = [kernel_relative_error(dense[(k, s)], K) for s in dense_seeds]
                    row.update(error=sum(errs) / len(errs), error_seeds=errs,
                               error_source=f"measured, seeds {','.join(map(str, dense_seeds))}",
                               timing="bare gradients + projection extrapolated from 400k of P rows; error: measured "
                                      "(dntk's gaussian map on the exact gradients, computed blockwise)")
                rows.append(row)
            for name in ("sjlt", "tensorsketch"):
                p = make(name, k=k, seed=0)
                dntk.gradient_features(model, x[:2], p, progress=False)  # builds hashes once
                with peak_memory() as mem:
                    t = time.perf_counter()
                    r = dntk.gradient_features(model, x, p, progress=False)
                    ms = (time.perf_counter() - t) * 1000 / (n * C)
                errs = [kernel_relative_error(r.kernel(), K)]
                for seed in (1, 2):
                    errs.append(kernel_relative_error(dntk.gradient_features(model, x, make(name, k=k, seed=seed), progress=False).kernel(), K))
                rows.append(dict(size=size, k=k, method=f"dntk {name}" + (" (default)" if name == dntk.projection.DEFAULT else ""),
                                 ms=ms, peak_mb=mem["peak_mb"], error=sum(errs) / len(errs), error_seeds=errs,
                                 error_source="measured, seeds 0,1,2", timing="measured"))
        for r in rows:
            if r["size"] == size:
                r.setdefault("exact_ntk_s", t_exact)
        print(table([r for r in rows if r["size"] == size], COLUMNS))
    return rows


COLUMNS = [("size", "input", "{}px"), ("k", "k", "{}"), ("method", "method", ""), ("ms", "ms / (sample, logit)", "{:.2f}"),
           ("peak_mb", "peak MB", "{:.0f}"), ("error", "kernel rel. error", "{:.4f}"), ("error_source", "error from", "")]


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
                "error_dense_gaussian": gauss["error"],  # measured on the same points and seeds
                "error_dense_gaussian_seeds": gauss.get("error_seeds"),
                "error_dense_gaussian_closed_form": gauss["error_closed_form"],
                "peak_mb_default": default["peak_mb"],
            }
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="one size, one k, 8 images, dense seed 0 only: a smoke run")
    ap.add_argument("--dense-seeds", type=int, default=None,
                    help="seeds 0..N-1 for the measured dense-Gaussian error (default 3, the sketches' seeds; "
                         "1 with --quick); each costs P·k random numbers and 2·C·n·P·k flops per (size, k)")
    args = ap.parse_args()
    n_dense = args.dense_seeds if args.dense_seeds is not None else (1 if args.quick else 3)
    if n_dense < 1:
        ap.error(f"--dense-seeds must be an integer ≥ 1, got {n_dense}")
    rows = run(args.quick, list(range(n_dense)))
    summary = summarise(rows)
    print("\nSummary (targets: ≥200× faster than the recipe at k=4096, error ≤ dense Gaussian's, ≤2× bare gradients):")
    for key, s in summary.items():
        print(f"  {key}: {s['default']} is {s['speedup_vs_recipe']:.0f}× faster than the recipe, "
              f"{s['cost_vs_bare_gradients']:.2f}× the bare gradients, error {s['error_default']:.4f} vs "
              f"measured dense Gaussian {s['error_dense_gaussian']:.4f} (closed form "
              f"{s['error_dense_gaussian_closed_form']:.4f}), peak {s['peak_mb_default']:.0f} MB")
    path = write_json("features.json" if not args.quick else "features_quick.json",
                      {"machine": machine(), "rows": rows, "summary": summary,
                       "notes": __doc__.strip().split("\n\n", 2)[1:]})
    print(f"wrote {path}")


def _extrapolated(r) -> bool:
    return "extrapolated" in (r.get("timing") or "")


def render(d: dict) -> tuple[str, str]:
    """From features.json: the benchmarks page's table with its summary and targets (block
    ``features-table``) and the projector comparison of docs/engine.md (``projectors-table``, 32 px, k = 4096)."""
    rows, summ, m = d["rows"], d["summary"], d["machine"]
    lines = [f"`python3 benchmarks/bench_features.py` ({m['cpu_threads']} threads of a {m['cores']}-core CPU, torch "
             f"{m['torch']}; `benchmarks/results/features.json`):", "",
             "| input | k | method | ms / (sample, logit) | peak MB | kernel rel. error |", "|---|---|---|---|---|---|"]
    for r in rows:
        name = r["method"].replace("(default)", "").strip()
        name = f"**{name} (default)**" if r["method"].endswith("(default)") else name
        cells = [f"{r['size']} px", "–" if r["k"] is None else str(r["k"]), name + (" †" if _extrapolated(r) else ""),
                 f"{r['ms']:,.2f}", "–" if r.get("peak_mb") is None else f"{r['peak_mb']:.0f}",
                 "–" if r.get("error") is None else f"{r['error']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    exact = {r["size"]: r["exact_ntk_s"] for r in rows if r.get("exact_ntk_s")}
    lines += ["", "† timed on a fraction and extrapolated; their errors are the closed-form expectation of a dense "
              "Gaussian map. Peak MB = rise of peak RSS during the measurement. Exact per-class eNTK of the images: "
              + ", ".join(f"{v:.0f} s ({k} px)" for k, v in sorted(exact.items())) + ".", ""]
    for key, s in summ.items():
        lines.append(f"- {key.replace('px_k', ' px, k = ')}: the default is {s['speedup_vs_recipe']:,.0f}× faster than the "
                     f"recipe, {s['cost_vs_bare_gradients']:.2f}× the bare-gradient cost, error {s['error_default']:.4f} "
                     f"vs dense Gaussian {s['error_dense_gaussian']:.4f}, peak {s['peak_mb_default']:.0f} MB")
    at = {k: v for k, v in summ.items() if k.endswith("k4096")}
    fast = min(v["speedup_vs_recipe"] for v in at.values())
    err_ok = all(v["error_default"] <= v["error_dense_gaussian"] for v in at.values())
    cost = max(v["cost_vs_bare_gradients"] for v in at.values())
    lines += ["", f"Targets at k = 4096: ≥ 200× faster than the recipe — {'met' if fast >= 200 else 'not met'} (at least "
              f"{fast:,.0f}×); error no worse than the dense Gaussian's — {'met' if err_ok else 'not met'}; cost within 2× of "
              f"bare gradients — {'met' if cost <= 2 else 'not met'} (at most {cost:.2f}×)."]
    small = [r for r in rows if r["size"] == min(r["size"] for r in rows) and r["k"] == 4096]
    proj = ["| projector | ms / (sample, logit), ResNet-18, 32 px, k = 4096 | kernel rel. error |", "|---|---|---|"]
    for r in small:
        if r["method"].startswith("common"):
            continue
        name = r["method"].replace("dntk ", "").replace(" (default)", "")
        bold = r["method"].endswith("(default)")
        ms, err = f"{r['ms']:,.1f}" + (" †" if _extrapolated(r) else ""), f"{r['error']:.3f}"
        proj.append(f"| {'**`' + name + '`** (default)' if bold else '`' + name + '`'} | "
                    f"{'**' + ms + '**' if bold else ms} | {'**' + err + '**' if bold else err} |")
    proj += ["", "From `benchmarks/results/features.json` († extrapolated from a fraction of the parameter rows; dense "
             "errors are the closed-form expectation)."]
    return "\n".join(lines), "\n".join(proj)


if __name__ == "__main__":
    main()
