"""The main job on the models and data people bring: one `dntk run` per --model form, and the Python
API with token inputs, each end to end (teacher → features → per-class KRR → results.json + figures).

Images: the ImageNette sample (100 train / 50 val per class, 10 classes) at 64 px from ../shared/data
(`DNTK_DATA` overrides), teachers trained here for a few epochs (CPU-sized, not tuned for accuracy).
Text: there is no text corpus offline here, so the token task is synthetic and stated as such — each
class draws its tokens from its own Zipf-shaped distribution over a 200-token vocabulary, sequences of
8–32 tokens; a BERT (2 layers, hidden 64) from a config, fine-tuned here, saved with save_pretrained,
and the data saved with DatasetDict.save_to_disk, so the run reads exactly what a user's files are.

    python3 benchmarks/bench_own_models.py            # ≈ 10 min on 2 cores
Writes benchmarks/results/own_models.json and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, write_json, write_readme_block  # noqa: E402

DATA = Path(os.environ.get("DNTK_DATA", ROOT.parent / "shared" / "data")) / "imagenette2-224-sample"

FACTORY = '''
import torch.nn as nn


def build(num_classes, in_channels=3):
    """A user's own network: conv-BN-ReLU x3, global pool, linear head."""
    def block(i, o, s):
        return [nn.Conv2d(i, o, 3, stride=s, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]
    return nn.Sequential(*block(in_channels, 32, 1), *block(32, 64, 2), *block(64, 64, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes))
'''


def dntk_run(args: list[str], out: Path) -> dict:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "dntk", "run", *args, "--quiet", "--out", str(out)], capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise RuntimeError(f"dntk run {' '.join(args)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    res = json.loads((out / "results.json").read_text())
    return row(res, time.perf_counter() - t, "dntk run " + " ".join(args), r.stdout)


def row(res: dict, seconds: float, command: str, stdout: str = "") -> dict:
    km = res["kernel_model"]
    estimate = next((line for line in stdout.splitlines() if line.startswith("features:")), "")
    rel = lambda text: text.replace(str(ROOT) + "/", "")   # noqa: E731 — paths inside the repository, relative
    return {"command": rel(command), "model": rel(res["teacher"]["model"]), "parameters": res["teacher"]["parameters"],
            "teacher_accuracy": res["teacher"]["test_accuracy"], "trained_here": res["teacher"]["best_epoch"] is not None,
            "m": res["counts"]["m"], "n_test": res["counts"]["n_test"], "classes": res["counts"]["classes"],
            "per_logit_gradients": res["counts"]["per_sample_gradients"], "k": res["counts"]["k"],
            "fidelity": km["fidelity"], "accuracy": km["accuracy"], "mse": km["mse"],
            "fast_path_share": res["gradient_paths"].get("factored", 0) + res["gradient_paths"].get("closed", 0),
            "seconds": seconds, "feature_seconds": res["timings_s"].get("features_train", 0)
            + res["timings_s"].get("features_test", 0), "estimate_line": estimate}


def token_task(C=4, n_train=800, n_test=400, vocab=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    ranks = torch.arange(1, vocab - 3, dtype=torch.float64)
    dists = []
    for c in range(C):   # each class: a Zipf distribution over its own random ordering of the vocabulary
        perm = torch.randperm(vocab - 4, generator=g)
        p = torch.zeros(vocab - 4, dtype=torch.float64)
        p[perm] = 1.0 / ranks
        dists.append(p / p.sum())

    def rows(n):
        out = []
        for i in range(n):
            y = i % C
            L = int(torch.randint(8, 33, (1,), generator=g))
            ids = torch.multinomial(dists[y], L, replacement=True, generator=g) + 4
            ids[0] = 2   # a [CLS]-like first token
            out.append({"input_ids": ids.tolist(), "attention_mask": [1] * L, "label": y})
        return out
    return rows(n_train), rows(n_test)


def text_setup(work: Path, C=4):
    import datasets
    import transformers

    tr, te = token_task(C)
    names = [f"topic{c}" for c in range(C)]
    dd = datasets.DatasetDict({s: datasets.Dataset.from_list(r).cast_column("label", datasets.ClassLabel(names=names))
                               for s, r in (("train", tr), ("test", te))})
    dd.save_to_disk(str(work / "tokens"))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, num_labels=C, max_position_embeddings=64, pad_token_id=0)
    transformers.BertForSequenceClassification(cfg).save_pretrained(work / "bert-init")
    return tr, te


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default=str(ROOT / "runs" / "own-models"))
    ap.add_argument("--only", default=None, help="comma-separated row names")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(2)
    images = ["--dataset", "folder", "--data-root", str(DATA), "--image-size", "64", "--m", "200", "--n-test", "200"]
    (work / "mynet.py").write_text(FACTORY)
    previous = RESULTS / "own_models.json"
    rows = json.loads(previous.read_text())["rows"] if previous.exists() else {}   # --only updates these rows
    plan = {
        "torchvision": lambda: dntk_run(images + ["--model", "torchvision:shufflenet_v2_x0_5", "--epochs", "20",
                                                  "--optimizer", "adamw"], work / "tv"),
        "timm": lambda: dntk_run(images + ["--model", "timm:convnext_atto", "--epochs", "15", "--optimizer", "adamw"],
                                 work / "timm"),
        "file": lambda: dntk_run(images + ["--model", f"{work / 'mynet.py'}:build", "--epochs", "30"], work / "file"),
    }

    def hf():
        text_setup(work)
        # fine-tune the BERT from its folder (--train-teacher always), then analyse the fine-tuned folder as a user would
        ft = dntk_run(["--model", f"hf:{work / 'bert-init'}", "--dataset", "hf-disk", "--data-root",
                       str(work / "tokens"), "--train-teacher", "always", "--epochs", "4", "--optimizer", "adamw",
                       "--lr", "1e-3", "--train-batch-size", "32", "--m", "200", "--n-test", "200"], work / "hf-train")
        import transformers

        from dntk.models import load_checkpoint
        model = transformers.BertForSequenceClassification.from_pretrained(work / "bert-init")
        best = json.loads((work / "hf-train" / "results.json").read_text())["teacher"]["source"]
        load_checkpoint(model, best)
        model.save_pretrained(work / "bert-finetuned")
        rows["hf-finetune"] = ft
        return dntk_run(["--model", f"hf:{work / 'bert-finetuned'}", "--dataset", "hf-disk", "--data-root",
                         str(work / "tokens"), "--m", "200", "--n-test", "200"], work / "hf")

    def api():
        import transformers

        import dntk

        tr, te = token_task()

        class Tokens(torch.utils.data.Dataset):
            def __init__(self, rows):
                self.rows = rows

            def __len__(self):
                return len(self.rows)

            def __getitem__(self, i):
                r = self.rows[i]
                return {"input_ids": torch.tensor(r["input_ids"]), "attention_mask": torch.tensor(r["attention_mask"])}, \
                    r["label"]

        model = transformers.BertForSequenceClassification.from_pretrained(work / "bert-finetuned")
        t = time.perf_counter()
        res = dntk.run(dntk.RunConfig.from_options(m=200, n_test=200, out=str(work / "api"), progress=False),
                       model=model, train_set=Tokens(tr), test_set=Tokens(te))
        return row(res.to_dict() if hasattr(res, "to_dict") else json.loads((work / "api" / "results.json").read_text()),
                   time.perf_counter() - t, "dntk.run(cfg, model=bert, train_set=Tokens(...), test_set=Tokens(...))")

    plan["hf"] = hf
    plan["api"] = api
    only = set(args.only.split(",")) if args.only else None
    for name, fn in plan.items():
        if only and name not in only:
            continue
        print(f"running {name} ...", flush=True)
        rows[name] = fn()
        write_json("own_models.json", {"rows": rows, "machine": f"{os.cpu_count()} cores, torch {torch.__version__}"})
    table = render(rows)
    print("\n" + table)
    if write_readme_block("own-models-table", table.rstrip("\n")):
        print("updated the table in README.md")


def render(rows: dict) -> str:
    """The README table, from the JSON rows."""
    lines = ["Measured by `python3 benchmarks/bench_own_models.py` (2 cores, no GPU; `benchmarks/results/own_models.json`): "
             "ImageNette sample at 64 px (1,000 train / 500 val photos, teachers trained here for 15–30 epochs, "
             "CPU-sized), and a synthetic 4-topic token task (Zipf token distributions per topic, 8–32 tokens; no "
             "text corpus is available offline here) with a 2-layer BERT fine-tuned here. m = 200 training points, "
             "200 test points, tensorsketch k = 4,096. *s (run)*: the whole `dntk run`, teacher training included.",
             "",
             "| form | model | P | teacher acc. | C | per-logit gradients | fidelity | KRR acc. | fast-path share | "
             "s (run) | s (features) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        lines.append(f"| {name} | `{r['model']}` | {r['parameters']:,} | {r['teacher_accuracy']:.4f}"
                     f"{'' if r['trained_here'] else ' (given)'} | {r['classes']} | {r['per_logit_gradients']:,} | "
                     f"{r['fidelity']:.4f} | {r['accuracy']:.4f} | {r['fast_path_share']:.4f} | {r['seconds']:.0f} | "
                     f"{r['feature_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
