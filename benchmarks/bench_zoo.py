"""The per-logit engine on the models people bring: full-size torchvision and timm classifiers.

Usage:  python benchmarks/bench_zoo.py [--size 64] [--n 16] [--batch 8] [--models a,b,...] [--device cuda]

For every model (random initialisation, BatchNorm statistics calibrated on the batch, C = 10
logits, ImageNette photos resized to --size) it reports:

- P and the share of parameters per gradient path (dntk.FeatureResult.paths): ``factored``
  (Linear/Conv weights as outer-product factors), ``closed`` (biases, norms, grouped convs,
  embeddings in closed form), ``derived`` (weights computed from parameters, pulled back),
  ``op-vjp`` (any other call's own vjp per sample); "fast" = factored + closed;
- ms per (sample, logit) of the default projector (tensorsketch, k = 4096) against bare
  per-sample gradients of the same model: ``torch.func`` vmap(grad) per logit over the same
  batches, timed in the same run (the floor a hand-written script pays before any projection);
- peak RSS rise of each, the median over the repetitions (on a GPU, ``--device cuda``: the peak GPU memory
  PyTorch allocated);
- the per-class kernel's relative Frobenius error against the exact eNTK (dntk.empirical_ntk) on
  the first 4 images and logits 0–1 (exact kernels of more logits do not fit the memory of a
  2-core machine for the largest models).

Both sides run on ``--device`` (CUDA timings are taken between ``torch.cuda.synchronize()`` calls).
Writes benchmarks/results/zoo.json (``--json``: another name there, or an absolute path) and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dntk  # noqa: E402
from common import machine, peak_memory, real_images, table, write_json  # noqa: E402
from dntk.metrics import kernel_relative_error  # noqa: E402
from dntk.projection import make  # noqa: E402


def builders(size: int) -> dict:
    tv = torchvision.models
    out = {
        "resnet18": lambda: tv.resnet18(num_classes=10),
        "mobilenet_v3_small": lambda: tv.mobilenet_v3_small(num_classes=10),
        "efficientnet_b0": lambda: tv.efficientnet_b0(num_classes=10),
        "convnext_tiny": lambda: tv.convnext_tiny(num_classes=10),
        "regnet_y_400mf": lambda: tv.regnet_y_400mf(num_classes=10),
        "vit_b_16": lambda: tv.vit_b_16(num_classes=10, image_size=size),
        "swin_t": lambda: tv.swin_t(num_classes=10),
    }
    try:
        import timm

        out.update({
            "timm resnetv2_50x1_bit (StdConv)": lambda: timm.create_model("resnetv2_50x1_bit", pretrained=False, num_classes=10),
            "timm deit3_small (cls token, layer scale)": lambda: timm.create_model(
                "deit3_small_patch16_224", pretrained=False, num_classes=10, img_size=size),
            "timm convnext_atto": lambda: timm.create_model("convnext_atto", pretrained=False, num_classes=10),
            "timm vit_tiny": lambda: timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10,
                                                       img_size=size),
        })
    except ImportError:
        print("[warn] timm not installed: timm models skipped")
    return out


VOCAB, SEQ, HIDDEN = 1000, 64, 256


class LSTMClassifier(torch.nn.Module):
    """A 2-layer LSTM text classifier: embedding (padding 0), LSTM, masked mean over the tokens, a linear head."""

    def __init__(self, vocab=VOCAB, hidden=HIDDEN, C=10):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, hidden, padding_idx=0)
        self.lstm = torch.nn.LSTM(hidden, hidden, num_layers=2, batch_first=True)
        self.head = torch.nn.Linear(hidden, C)

    def forward(self, input_ids, attention_mask):
        h, _ = self.lstm(self.emb(input_ids))
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        return self.head((h * m).sum(1) / m.sum(1))


def additive_mask(x: dict, causal: bool) -> dict:
    """The same inputs with the padding (and, ``causal``, the causal) mask as a 4-D additive float mask
    [B, 1, T, T]/[B, 1, 1, T], which Hugging Face models apply as given: under ``vmap`` their 2-D mask path
    branches on the mask's values (``padding_mask.all()``), which vmap refuses. Only the bare baseline uses it;
    the benchmark checks that it gives the same logits."""
    pad = x["attention_mask"].float()
    T = pad.shape[1]
    allowed = (torch.tril(torch.ones(T, T, device=pad.device))[None, None] if causal else 1.0) * pad[:, None, None, :]
    return {"input_ids": x["input_ids"], "attention_mask": (1 - allowed) * torch.finfo(torch.float32).min}


def text_builders() -> dict:
    """Token-id classifiers (random init from a config: no download), C = 10, hidden 256, sequences of 64:
    {name: (build, inputs for the bare vmap(grad) baseline from the engine's inputs)}."""
    same = lambda x: x  # noqa: E731
    out = {"lstm 2-layer (tokens)": (lambda: LSTMClassifier(), same)}
    try:
        import transformers as tf

        out.update({
            "hf bert (tokens)": (lambda: tf.BertForSequenceClassification(tf.BertConfig(
                vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=4, num_attention_heads=4, intermediate_size=4 * HIDDEN,
                max_position_embeddings=128, num_labels=10, attn_implementation="eager")),
                lambda x: additive_mask(x, causal=False)),
            "hf gpt2 (tokens)": (lambda: tf.GPT2ForSequenceClassification(tf.GPT2Config(
                vocab_size=VOCAB, n_embd=HIDDEN, n_layer=4, n_head=4, n_positions=128, num_labels=10, pad_token_id=0,
                bos_token_id=1, eos_token_id=1, attn_implementation="eager")),
                lambda x: additive_mask(x, causal=True)),
        })
    except ImportError:
        print("[warn] transformers not installed: Hugging Face models skipped")
    return out


def token_batch(n: int, seq: int = SEQ, seed: int = 0) -> dict:
    """n sequences of random token ids (1..VOCAB-1), lengths uniform in [seq/2, seq], padded with 0 to seq:
    {"input_ids", "attention_mask"} [n, seq]."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (n, seq), generator=g)
    lengths = torch.randint(seq // 2, seq + 1, (n,), generator=g)
    mask = (torch.arange(seq) < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def wake(model):
    """Zero-initialised parameters (torchvision ViT's head) block every gradient below them at
    initialisation; give them small random values so every path is exercised."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() and not bool(p.any()):
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model


def calibrate(model, x):
    """BatchNorm running statistics from the batch itself (so eval-mode outputs are sensible)."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@contextmanager
def peak(device):
    """Peak memory of a block (MB): the RSS rise on the CPU, the peak GPU memory allocated on CUDA."""
    if torch.device(device).type != "cuda":
        with peak_memory() as box:
            yield box
        return
    box = {"peak_mb": float("nan")}
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    try:
        yield box
    finally:
        torch.cuda.synchronize()
        box["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20


def bare_gradients(model, x, C, batch):
    """vmap(grad) of each logit over each batch: the per-sample gradients themselves."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in model.named_parameters()}
    buffers = {n: b for n, b in model.named_buffers()}
    n = dntk.samples.count(x)
    for c in range(C):
        def f(p, xi, c=c):
            if isinstance(xi, dict):   # token inputs: keyword arguments, as the engine passes them
                out = functional_call(model, (p, buffers), (), {k: v.unsqueeze(0) for k, v in xi.items()})
            else:
                out = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
            return dntk.samples.logits_of(out)[0, c]

        for s in range(0, n, batch):
            g = vmap(grad(f), in_dims=(None, 0))(params, dntk.samples.take(x, slice(s, s + batch)))
            del g


def kernel_error(model, x, k, seed=0):
    classes = [0, 1]
    exact = dntk.empirical_ntk(model, x, classes=classes, batch_size=1)
    feats = dntk.gradient_features(model, x, make("tensorsketch", k=k, seed=seed), classes=classes,
                                   progress=False).kernel()
    return kernel_relative_error(feats, exact)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--n", type=int, default=16, help="images timed per model")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions of each side, alternated; the table gives medians")
    ap.add_argument("--seq", type=int, default=SEQ, help="tokens per sequence of the text models (padded)")
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--models", default=None, help="comma-separated subset of the model names")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", default="zoo.json", help="results file name under benchmarks/results/ (or an absolute path)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda: where both the engine and the baseline run")
    ap.add_argument("--data-root", default=None,
                    help="ImageFolder whose val split gives the images (default: ../shared/data/imagenette2-224-sample)")
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error(f"--reps must be ≥ 1, got {args.reps}")
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = args.device
    if torch.device(dev).type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {dev}: no CUDA device here")
    torch.manual_seed(0)
    C = 10
    rows = []
    todo = {name: (build, "image", None) for name, build in builders(args.size).items()}
    todo.update({name: (build, "tokens", bare) for name, (build, bare) in text_builders().items()})
    if args.models:
        keep = args.models.split(",")
        todo = {k: v for k, v in todo.items() if any(k.startswith(w) for w in keep)}
    x_img = real_images(max(args.n, 4), args.size, root=args.data_root).to(dev) if any(
        kind == "image" for _, kind, _ in todo.values()) else None
    x_tok = dntk.samples.to(token_batch(max(args.n, 4), args.seq), dev)
    for name, (build, kind, bare_inputs) in todo.items():
        torch.manual_seed(0)
        x_all = x_img if kind == "image" else x_tok
        x = dntk.samples.take(x_all, slice(0, args.n))
        model = wake(build()).to(dev)
        model = calibrate(model, x) if kind == "image" else model.eval()
        P = sum(p.numel() for p in model.parameters() if p.requires_grad)
        x_bare = bare_inputs(x) if bare_inputs else x
        if x_bare is not x:   # the baseline's inputs must be the same function of the model
            with torch.no_grad():
                gap = float((dntk.samples.logits_of(dntk.samples.call(model, x_bare))
                             - dntk.samples.logits_of(dntk.samples.call(model, x))).abs().max())
            if gap > 1e-4:
                raise SystemExit(f"{name}: the baseline's mask changes the logits by {gap:.2e}")
        dntk.gradient_features(model, dntk.samples.take(x, slice(0, 2)), make("tensorsketch", k=args.k, seed=0),
                               progress=False)  # warm-up
        t_d, t_b, mem_dntk, mem_bare = [], [], [], []
        for rep in range(args.reps):   # alternated, so a slow spell of the machine hits both sides
            with peak(dev) as mem_d:
                sync(dev)
                t = time.perf_counter()
                r = dntk.gradient_features(model, x, make("tensorsketch", k=args.k, seed=0), batch_size=args.batch,
                                           progress=False)
                sync(dev)
                t_d.append(time.perf_counter() - t)
            with peak(dev) as mem_b:
                sync(dev)
                t = time.perf_counter()
                bare_gradients(model, x_bare, C, args.batch)
                sync(dev)
                t_b.append(time.perf_counter() - t)
            mem_dntk.append(mem_d["peak_mb"])
            mem_bare.append(mem_b["peak_mb"])
        # the median of the repetitions' peaks: the RSS rise of one repetition moves with what the allocator
        # kept from the last one (tens of MB), the computation's own peak does not
        peak_d, peak_b = statistics.median(mem_dntk), statistics.median(mem_bare)
        shares = r.path_shares()
        err = kernel_error(model, dntk.samples.take(x_all, slice(0, 4)), args.k)
        ms = lambda ts: [1000 * t / (args.n * C) for t in ts]  # noqa: E731
        row = {"model": name, "inputs": kind, "P": P, "fast": shares.get("factored", 0) + shares.get("closed", 0),
               "derived": shares.get("derived", 0.0), "op_vjp": shares.get("op-vjp", 0.0),
               "ms_dntk": statistics.median(ms(t_d)), "ms_bare": statistics.median(ms(t_b)),
               "ms_dntk_reps": ms(t_d), "ms_bare_reps": ms(t_b),
               "peak_dntk_mb": peak_d, "peak_bare_mb": peak_b, "peak_dntk_reps": mem_dntk, "peak_bare_reps": mem_bare,
               "kernel_err": err,
               "paths": r.paths, "device": str(dev),
               "peak_kind": "GPU memory allocated" if torch.device(dev).type == "cuda" else "RSS rise"}
        row["ratio"] = row["ms_dntk"] / row["ms_bare"]
        es = r.engine_seconds   # the last repetition's phases (FeatureResult.engine_seconds)
        row["engine_share"] = {k_: v / max(sum(es.values()), 1e-12) for k_, v in es.items()}
        ratios = [a / b for a, b in zip(t_d, t_b)]
        row["ratio_spread"] = [min(ratios), max(ratios)]
        rows.append(row)
        print(f"{name}: P={P:,} fast={row['fast']:.4f} derived={row['derived']:.4f} op-vjp={row['op_vjp']:.4f} "
              f"dntk {row['ms_dntk']:.2f} ms vs bare {row['ms_bare']:.2f} ms ({row['ratio']:.2f}×, per rep "
              f"{min(ratios):.2f}–{max(ratios):.2f}), peak {peak_d:.0f} / {peak_b:.0f} MB, kernel error {err:.4f}", flush=True)
        del model, r
    cols = [("model", "model", ""), ("P", "P", "{:,}"), ("fast", "fast path", "{:.2%}"),
            ("derived", "derived", "{:.2%}"), ("op_vjp", "op-vjp", "{:.2%}"),
            ("ms_dntk", "dntk ms/(sample, logit)", "{:.2f}"), ("ms_bare", "bare vmap(grad) ms", "{:.2f}"),
            ("ratio", "dntk / bare", "{:.2f}"), ("peak_dntk_mb", "peak MB dntk", "{:.0f}"),
            ("peak_bare_mb", "peak MB bare", "{:.0f}"), ("kernel_err", "kernel rel. error (k=4096)", "{:.4f}")]
    print(table(rows, cols))
    gpu = torch.cuda.get_device_name(torch.device(dev)) if torch.device(dev).type == "cuda" else None
    path = write_json(args.json, {"machine": {**machine(), "gpu": gpu}, "args": vars(args), "rows": rows})
    print(f"wrote {path}")


def _where(d: dict) -> str:
    m = d["machine"]
    return (f"on {m['gpu']}" if m.get("gpu") else
            f"{m['cpu_threads']} thread{'s' * (m['cpu_threads'] != 1)} of a {m['cores']}-core CPU")


def render(runs) -> tuple[str, str, str]:
    """From zoo.json (the targets' run: 2 threads) and, when given, the same benchmark at 1 thread
    (zoo_1thread.json; ``runs`` is (main, other or None)): the docs' zoo table (block ``zoo-table``: the
    settings and machine, one row per model, the other run's ratio beside), its summary against the targets
    (``zoo-summary``) and the README's one-sentence headline (``zoo-headline``)."""
    d, d1 = runs if isinstance(runs, tuple) else (runs, None)
    a, m = d["args"], d["machine"]
    reps = a.get("reps", 1)
    text = any(r.get("inputs") == "tokens" for r in d["rows"])
    cmd = lambda x: f"`python3 benchmarks/bench_zoo.py --threads {x['args']['threads']}`"  # noqa: E731
    head = (f"{cmd(d)} ({a['n']} ImageNette photos at {a['size']} px"
            + (f" or {a['n']} token sequences of up to {a['seq']} tokens, padded" if text else "")
            + f", in batches of {a['batch']}, k = {a['k']}, {_where(d)}, torch {m['torch']}"
            + (f"; times and peaks are medians of {reps} alternated repetitions" if reps > 1 else "")
            + f"; `benchmarks/results/{Path(a['json']).name}`"
            + (f"; the last column from {cmd(d1)}, {_where(d1)}, `benchmarks/results/{Path(d1['args']['json']).name}`"
               if d1 else "") + "):")
    other = {r["model"]: r for r in d1["rows"]} if d1 else {}
    lines = [head, "", "| model | P | fast path (factored + closed) | derived | op-vjp | dntk ms / (sample, logit) | "
             "bare vmap(grad) ms | dntk / bare (per rep) | peak MB dntk / bare | kernel rel. error |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    shares = all("engine_share" in r for r in d["rows"])
    if shares:   # the engine's time split: recording (forward + layout checks) against computing
        lines[2] += " record / check / compute |"
        lines[3] += "---|"
    if d1:
        lines[2] += f" dntk / bare, {d1['machine']['cpu_threads']} thread{'s' * (d1['machine']['cpu_threads'] != 1)} |"
        lines[3] += "---|"
    for r in d["rows"]:
        spread = r.get("ratio_spread")
        lines.append(f"| {r['model']} | {r['P']:,} | {r['fast']:.2%} | {r['derived']:.2%} | {r['op_vjp']:.2%} | "
                     f"{r['ms_dntk']:.1f} | {r['ms_bare']:.1f} | **{r['ms_dntk'] / r['ms_bare']:.2f}**"
                     + (f" ({spread[0]:.2f}–{spread[1]:.2f})" if spread and reps > 1 else "") + " | "
                     f"{r['peak_dntk_mb']:.0f} / {r['peak_bare_mb']:.0f} ({r['peak_dntk_mb'] / r['peak_bare_mb']:.2f}×) | "
                     f"{r['kernel_err']:.4f} |"
                     + (" {:.0%} / {:.0%} / {:.0%} |".format(r["engine_share"]["record"], r["engine_share"]["check"],
                                                           1 - r["engine_share"]["record"] - r["engine_share"]["check"])
                        if shares else "")
                     + ((f" {other[r['model']]['ms_dntk'] / other[r['model']]['ms_bare']:.2f} |" if r["model"] in other
                         else " — |") if d1 else ""))
    rows = d["rows"]
    ratio = {r["model"]: r["ms_dntk"] / r["ms_bare"] for r in rows}
    fast = [r for r in rows if r["fast"] >= 0.999]
    quick = sorted((x for x in ratio.items() if x[1] <= 1.0), key=lambda x: x[1])
    slow = sorted((x for x in ratio.items() if x[1] > 1.0), key=lambda x: x[1])
    mem = {r["model"]: r["peak_dntk_mb"] / r["peak_bare_mb"] for r in rows}
    hi, lo = max(mem.items(), key=lambda x: x[1]), min(mem.items(), key=lambda x: x[1])
    over = sorted((x for x in mem.items() if x[1] > 1.0), key=lambda x: -x[1])
    fmt = lambda xs: ", ".join(f"{m} {v:.2f}×" for m, v in xs)  # noqa: E731
    summary = [
        f"- **Fast-path share** (≥ 99.9% of P factored or closed form): {len(fast)} of {len(rows)} models"
        + ("" if len(fast) == len(rows) else " — not "
           + ", ".join(f"{r['model']} ({r['fast']:.1%} fast, {r['op_vjp']:.1%} op-vjp, {r['derived']:.1%} derived)"
                       for r in rows if r["fast"] < 0.999)) + ".",
        f"- **Speed** (≤ 1× the bare per-sample gradients, {_where(d)}): {len(quick)} of {len(rows)} models — {fmt(quick)}"
        + (f"; above 1×: {fmt(slow)}" if slow else "") + "."]
    if d1:
        r1 = {r["model"]: r["ms_dntk"] / r["ms_bare"] for r in d1["rows"]}
        slow1 = sorted((x for x in r1.items() if x[1] > 1.0), key=lambda x: x[1])
        summary.append(f"- **Speed, {_where(d1)}**: {sum(v <= 1.0 for v in r1.values())} of {len(r1)} models ≤ 1×"
                       + (f"; above 1×: {fmt(slow1)}" if slow1 else "") + ".")
    summary.append(f"- **Peak memory** against the bare gradients': from {lo[1]:.2f}× ({lo[0]}) to {hi[1]:.2f}× ({hi[0]})"
                   + (f"; above 1×: {fmt(over)}" if over else "; at most 1× on every model") + ".")
    best = sorted(ratio.items(), key=lambda x: x[1])[:2]
    headline = (f"{cmd(d)} ({_where(d)}): at most as slow as bare per-sample gradients on {len(quick)} of {len(rows)} "
                f"models while also projecting ({fmt(best)}"
                + (f"; above: {fmt(slow)}" if slow else "") + "), within the rounding of brute-force autograd.")
    return "\n".join(lines), "\n".join(summary), headline


def render_longer(d: dict) -> str:
    """From zoo_n64.json (the same benchmark over more batches, ``--n 64``): one line per model — the ratio and
    the check's share of the engine's time, beside the two-batch table's (block ``zoo-n64``)."""
    a = d["args"]
    lines = [f"`python3 benchmarks/bench_zoo.py --threads {a['threads']} --n {a['n']} --models ...` ({a['n']} inputs in "
             f"{a['n'] // a['batch']} batches of {a['batch']}, {_where(d)}, medians of {a.get('reps', 1)}; "
             f"`benchmarks/results/{Path(a['json']).name}`): the first batch's measurement spread over more batches —", ""]
    for r in d["rows"]:
        sp = r.get("ratio_spread") or [r["ratio"], r["ratio"]]
        lines.append(f"- {r['model']}: **{r['ms_dntk'] / r['ms_bare']:.2f}×** bare ({sp[0]:.2f}–{sp[1]:.2f}), check "
                     f"{r['engine_share']['check']:.0%} of the engine's time, peak {r['peak_dntk_mb']:.0f} / "
                     f"{r['peak_bare_mb']:.0f} MB")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
