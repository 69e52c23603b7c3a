"""The main job on the models and data people bring (#20): every --model form end to end on tiny data,
every checkpoint form, inputs that are not one float tensor (tuples, dicts, token ids) against
brute-force autograd, pretrained weights from the local cache only, and a 100-class run.

Optional extras (timm, transformers + datasets) are installed by `.ci/run`; their tests skip only when
the package is missing."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import dntk
from dntk.cli import main
from dntk.errors import DNTKError
from dntk.models import build_model_spec, load_checkpoint, parse_model
from dntk.samples import PaddedTokens, count, take

from conftest import rel


# --- tiny data ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def rgb_folder(tmp_path_factory):
    """An ImageFolder of 3 classes of 32 px RGB photos-to-be (class = dominant colour + noise): 8 train and
    4 val images per class."""
    root = tmp_path_factory.mktemp("rgb")
    rng = np.random.default_rng(0)
    for split, n in (("train", 8), ("val", 4)):
        for c in range(3):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for i in range(n):
                a = rng.integers(0, 80, (40, 40, 3))
                a[..., c] += 150
                Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(d / f"{i}.png")
    return root


def _results(out) -> dict:
    out = Path(out)
    assert (out / "figure1.png").stat().st_size > 0
    return json.loads((out / "results.json").read_text())


def _check_counts(res, m, n_test, C):
    assert res["counts"]["m"] == m and res["counts"]["n_test"] == n_test and res["counts"]["classes"] == C
    assert res["counts"]["per_sample_gradients"] == (m + n_test) * C
    km = res["kernel_model"]
    assert np.isfinite(km["mse"]) and np.isfinite(km["condition_number"])


# --- the --model forms, end to end --------------------------------------------------------------------------
def test_torchvision_model_end_to_end(rgb_folder, tmp_path, capsys):
    out = tmp_path / "tv"
    rc = main(["run", "--dataset", "folder", "--data-root", str(rgb_folder), "--image-size", "32",
               "--model", "torchvision:shufflenet_v2_x0_5", "--epochs", "1", "--train-batch-size", "8", "--m", "12",
               "--k", "256", "--quiet", "--out", str(out)])
    assert rc == 0
    res = _results(out)
    _check_counts(res, 12, 12, 3)
    assert res["teacher"]["parameters"] == sum(
        p.numel() for p in build_model_spec("torchvision:shufflenet_v2_x0_5", 3).parameters())
    assert res["teacher"]["best_epoch"] == 1          # trained here: no weights were given
    said = capsys.readouterr().out
    assert "per-logit gradients" in said and "ms per sample" in said   # the estimate before extraction
    assert (Path(res["teacher"]["source"]).parent.name).startswith("teacher-")   # keyed by the model
    # the same model on other data (another image size) in the same OUT trains its own teacher
    assert main(["run", "--dataset", "folder", "--data-root", str(rgb_folder), "--image-size", "40",
                 "--model", "torchvision:shufflenet_v2_x0_5", "--epochs", "1", "--train-batch-size", "8", "--m", "12",
                 "--k", "256", "--quiet", "--out", str(out)]) == 0
    again = _results(out)
    assert again["teacher"]["source"] != res["teacher"]["source"] and again["teacher"]["best_epoch"] == 1


def test_timm_model_end_to_end(rgb_folder, tmp_path):
    pytest.importorskip("timm")
    out = tmp_path / "timm"
    assert main(["run", "--dataset", "folder", "--data-root", str(rgb_folder), "--image-size", "32",
                 "--model", "timm:test_convnext", "--epochs", "1", "--train-batch-size", "8", "--m", "9", "--k", "128",
                 "--quiet", "--out", str(out)]) == 0
    res = _results(out)
    _check_counts(res, 9, 12, 3)
    import timm

    assert res["teacher"]["parameters"] == sum(p.numel() for p in timm.create_model("test_convnext", num_classes=3)
                                               .parameters())
    assert res["teacher"]["best_epoch"] == 1


FACTORY = '''
import torch.nn as nn

def build(num_classes, in_channels=3, width=6):
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
                         nn.Flatten(), nn.Linear(4 * width, num_classes))

def no_classes(width=4):
    return nn.Linear(4, 2)

def not_a_module(num_classes):
    return "nope"
'''


def test_user_file_factory_end_to_end(rgb_folder, tmp_path):
    f = tmp_path / "mynet.py"
    f.write_text(FACTORY)
    out = tmp_path / "file"
    assert main(["run", "--dataset", "folder", "--data-root", str(rgb_folder), "--image-size", "32",
                 "--model", f"{f}:build", "--epochs", "2", "--train-batch-size", "8", "--m", "12", "--k", "64",
                 "--projector", "identity", "--exact", "--quiet", "--out", str(out)]) == 0
    res = _results(out)
    _check_counts(res, 12, 12, 3)
    # identity features of a user model through the whole job: the kernel equals the exact eNTK
    assert res["exact"]["kernel_relative_error"] < 1e-5
    assert res["teacher"]["parameters"] == 3 * 6 * 9 + 6 + 24 * 3 + 3
    # the factory is called with num_classes and only the arguments it names
    for name, says in (("no_classes", "does not accept num_classes"), ("not_a_module", "not a torch.nn.Module"),
                       ("missing", "has no attribute")):
        with pytest.raises(DNTKError, match=says):
            build_model_spec(f"{f}:{name}", 3)


def test_module_factory_and_parse_errors(tmp_path, monkeypatch):
    (tmp_path / "pkg_dntk_test").mkdir()
    (tmp_path / "pkg_dntk_test" / "__init__.py").write_text("")
    (tmp_path / "pkg_dntk_test" / "nets.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    m = build_model_spec("pkg_dntk_test.nets:build", 7, in_channels=1)
    assert m[-1].out_features == 7 and m[0].in_channels == 1
    with pytest.raises(DNTKError, match="cannot import"):
        build_model_spec("no_such_pkg_xyz.nets:build", 3)
    with pytest.raises(DNTKError, match="torchvision has no classification model 'resnet_18'.*resnet18"):
        build_model_spec("torchvision:resnet_18", 3)
    with pytest.raises(DNTKError, match="3-channel"):
        build_model_spec("torchvision:resnet18", 3, in_channels=1)
    assert parse_model("hf:./x").kind == "hf" and parse_model("a.b:c").kind == "factory"


def test_missing_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "timm", None)   # import timm now raises ImportError
    with pytest.raises(DNTKError, match=r'pip install "dntk\[timm\]"'):
        build_model_spec("timm:test_convnext", 3)
    monkeypatch.setitem(sys.modules, "transformers", None)
    with pytest.raises(DNTKError, match=r'pip install "dntk\[hf\]"'):
        build_model_spec("hf:/nonexistent", 3)


# --- pretrained weights: the local cache only ---------------------------------------------------------------
def test_torchvision_pretrained_from_cache_only(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(DNTKError, match=r"not in the local cache .*squeezenet1_1-b8a52dc0\.pth.*never downloads"):
        build_model_spec("torchvision:squeezenet1_1", 4, pretrained=True)
    torch.manual_seed(1)
    pre = torchvision.models.squeezenet1_1(num_classes=1000)   # stands in for the published weights
    ckpt = tmp_path / "torch" / "hub" / "checkpoints" / "squeezenet1_1-b8a52dc0.pth"
    ckpt.parent.mkdir(parents=True)
    torch.save(pre.state_dict(), ckpt)
    torch.manual_seed(2)
    model = build_model_spec("torchvision:squeezenet1_1", 4, pretrained=True)
    own, ref = model.state_dict(), pre.state_dict()
    head = {"classifier.1.weight", "classifier.1.bias"}
    assert own["classifier.1.weight"].shape[0] == 4
    assert all(torch.equal(own[k], ref[k]) for k in ref if k not in head)       # the backbone is the cached one
    assert main(["run", "--model", "small_cnn", "--pretrained", "--quiet", "--out", str(tmp_path / "o")]) == 1


def test_timm_pretrained_from_cache_only(tmp_path, monkeypatch):
    timm = pytest.importorskip("timm")
    safetensors = pytest.importorskip("safetensors.torch")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(DNTKError, match="not in the local cache"):
        build_model_spec("timm:test_efficientnet", 3, pretrained=True)
    torch.manual_seed(3)
    pre = timm.create_model("test_efficientnet", num_classes=1000)
    snap = tmp_path / "hub" / "models--timm--test_efficientnet.r160_in1k" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    safetensors.save_file({k: v.contiguous() for k, v in pre.state_dict().items()}, str(snap / "model.safetensors"))
    model = build_model_spec("timm:test_efficientnet", 3, pretrained=True)
    own, ref = model.state_dict(), pre.state_dict()
    assert own["classifier.weight"].shape[0] == 3
    assert all(torch.equal(own[k], ref[k]) for k in ref if not k.startswith("classifier."))


# --- checkpoints people save --------------------------------------------------------------------------------
class Wrapped(nn.Module):
    """A model whose own keys start with 'model.': a prefix that must not be stripped."""

    def __init__(self):
        super().__init__()
        self.model = nn.Linear(4, 3)


def test_checkpoint_forms(tmp_path):
    torch.manual_seed(0)
    src = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))
    sd = src.state_dict()

    def fresh():
        torch.manual_seed(9)
        return nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3))

    forms = {
        "plain.pt": sd,
        "lightning.ckpt": {"state_dict": {f"model.{k}": v for k, v in sd.items()}, "epoch": 3,
                           "hyper_parameters": {"lr": 0.1}},
        "script.pt": {"model": {f"module.{k}": v for k, v in sd.items()}, "optimizer": {"lr": 0.1}},
    }
    for name, obj in forms.items():
        torch.save(obj, tmp_path / name)
    save_file = pytest.importorskip("safetensors.torch").save_file
    save_file(sd, str(tmp_path / "w.safetensors"))
    for name in list(forms) + ["w.safetensors"]:
        m = load_checkpoint(fresh(), tmp_path / name)
        assert all(torch.equal(m.state_dict()[k], sd[k]) for k in sd), name
    # a folder holding a weights file (what save_pretrained writes)
    (tmp_path / "folder").mkdir()
    save_file(sd, str(tmp_path / "folder" / "model.safetensors"))
    assert torch.equal(load_checkpoint(fresh(), tmp_path / "folder")[2].weight, sd["2.weight"])
    # a model whose own keys carry 'model.': used as they are, and under DataParallel only 'module.' goes
    w = Wrapped()
    ref = {k: torch.randn_like(v) for k, v in w.state_dict().items()}
    torch.save(ref, tmp_path / "wrapped.pt")
    assert torch.equal(load_checkpoint(Wrapped(), tmp_path / "wrapped.pt").model.weight, ref["model.weight"])
    torch.save({f"module.{k}": v for k, v in ref.items()}, tmp_path / "dp.pt")
    assert torch.equal(load_checkpoint(Wrapped(), tmp_path / "dp.pt").model.weight, ref["model.weight"])
    # stripping must never merge two keys into one
    two = {**{f"model.{k}": v for k, v in sd.items()}, **{f"net.{k}": torch.zeros_like(v) for k, v in sd.items()}}
    torch.save(two, tmp_path / "two.pt")
    with pytest.raises(DNTKError, match="does not match"):
        load_checkpoint(fresh(), tmp_path / "two.pt")
    # a mismatch names the keys and shapes
    bad = dict(sd)
    bad["2.weight"] = torch.zeros(7, 5)
    bad["extra.bias"] = torch.zeros(2)
    del bad["0.bias"]
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(DNTKError) as e:
        load_checkpoint(fresh(), tmp_path / "bad.pt")
    msg = str(e.value)
    assert "missing keys (1): 0.bias" in msg and "unexpected keys (1): extra.bias" in msg
    assert "2.weight: checkpoint (7, 5) vs model (3, 5)" in msg


# --- inputs that are not one float tensor, against brute-force autograd --------------------------------------
class TwoInputs(nn.Module):
    """Token ids through an embedding, a float side input, an optional mask."""

    def __init__(self, C=3):
        super().__init__()
        self.emb, self.lin, self.head = nn.Embedding(20, 8), nn.Linear(5, 8), nn.Linear(8, C)

    def forward(self, ids, feats, mask=None):
        h = self.emb(ids)
        if mask is not None:
            h = h * mask[..., None]
        return self.head(torch.tanh(h.sum(1) + self.lin(feats)))


def _brute(model, call, n):
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(n):
        out = call(i)[0]
        rows.append(torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(out[c], params, retain_graph=True)])
                                 for c in range(out.shape[0])]))
    J = torch.stack(rows)
    return torch.einsum("icp,jcp->cij", J, J)


def test_tuple_dict_and_integer_inputs_match_brute_force(tmp_path):
    torch.manual_seed(0)
    m = TwoInputs().double()
    ids = torch.randint(0, 20, (7, 4))
    f = torch.randn(7, 5, dtype=torch.float64)
    mask = torch.ones(7, 4, dtype=torch.float64)
    mask[0, 2:] = 0
    K = _brute(m, lambda i: m(ids[i:i + 1], f[i:i + 1], mask[i:i + 1]), 7)
    for x in ((ids, f, mask), {"ids": ids, "feats": f, "mask": mask}):
        assert rel(dntk.empirical_ntk(m, x), K) < 1e-12
        assert rel(dntk.empirical_ntk(m, x, batch_size=3), K) < 1e-12
        r = dntk.gradient_features(m, x, "identity", batch_size=3, progress=False)
        assert rel(r.kernel(), K) < 1e-6                       # float32 features
        assert r.paths["emb.weight"] == "closed" and r.paths["lin.weight"] == "factored"
        Ks, _ = dntk.features.sliced_class_kernels(m, x, memory_budget_bytes=7 * 3 * 8 * 40)
        assert rel(Ks, K) < 1e-12
        # the store slices structured inputs by shard
        store = dntk.store.FeatureStore(tmp_path / f"s-{type(x).__name__}", shard=3)
        store.extract(m, x, dntk.projection.make("identity"), progress=False)
        assert rel(store.read().kernel(), K) < 1e-6
    with pytest.raises(DNTKError, match="disagree on the number of samples"):
        dntk.gradient_features(m, (ids, f[:3], mask), "identity", progress=False)


def test_padded_tokens_are_cut_per_batch_and_exact():
    """PaddedTokens: a batch is cut to its longest sequence; features equal the uncut brute force."""
    torch.manual_seed(1)

    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.pos, self.head = nn.Embedding(30, 6), nn.Parameter(torch.randn(9, 6)), nn.Linear(6, 4)

        def forward(self, input_ids, attention_mask):
            L = input_ids.shape[1]
            h = (self.emb(input_ids) + self.pos[:L]) * attention_mask[..., None]
            return self.head(h.sum(1) / attention_mask.sum(1, keepdim=True))

    m = Bag().double()
    lens = torch.tensor([2, 3, 9, 4, 2, 5])
    mask = (torch.arange(9)[None] < lens[:, None]).long()
    ids = torch.randint(1, 30, (6, 9)) * mask
    x = PaddedTokens({"input_ids": ids, "attention_mask": mask})
    assert take(x, [0, 1])["input_ids"].shape == (2, 3) and take(x, [2])["input_ids"].shape == (1, 9)
    assert count(x) == 6
    K = _brute(m, lambda i: m(ids[i:i + 1, :lens[i]], mask[i:i + 1, :lens[i]]), 6)
    r = dntk.gradient_features(m, x, "identity", batch_size=2, progress=False)
    assert rel(r.kernel(), K) < 1e-6
    assert r.paths["pos"] == "op-vjp" and r.paths["emb.weight"] == "closed"

    class Unmasked(Bag):   # averages over padding too: its logits depend on how far a batch is padded
        def forward(self, input_ids, attention_mask):
            return self.head(self.emb(input_ids).mean(1))

    with pytest.raises(DNTKError, match="or on its padding"):
        dntk.gradient_features(Unmasked().double(), x, "identity", batch_size=2, progress=False)

    # only sequence entries are cut: a float side input that happens to be [n, L] wide is taken whole
    side = PaddedTokens({"input_ids": ids, "attention_mask": mask, "scores": torch.randn(6, 9)})
    assert take(side, [0, 1])["scores"].shape == (2, 9) and take(side, [0, 1])["input_ids"].shape == (2, 3)


def test_mixing_through_integer_inputs_is_refused():
    """Integer inputs are not differentiated, so the weighted backward passes cannot see mixing through
    them: every sample of the first batch is then run alone (not only the first four)."""
    torch.manual_seed(0)

    class Peek(nn.Module):   # samples 4.. read the next sample's first token
        def __init__(self):
            super().__init__()
            self.emb, self.head = nn.Embedding(20, 4), nn.Linear(4, 2)

        def forward(self, ids):
            other = torch.roll(ids, -1, 0)
            use = torch.where(torch.arange(ids.shape[0])[:, None] >= 4, other, ids)
            return self.head(self.emb(use).sum(1))

    ids = torch.randint(0, 20, (8, 3))
    with pytest.raises(DNTKError, match="depends on the rest of its batch"):
        dntk.gradient_features(Peek(), ids, "identity", batch_size=8, progress=False)

# --- Hugging Face: a BERT from a config, a hf-disk dataset, the whole job ------------------------------------
def _tiny_bert(folder, C=3, seed=0):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, num_labels=C, max_position_embeddings=32, pad_token_id=0)
    model = transformers.BertForSequenceClassification(cfg).eval()
    model.save_pretrained(folder)
    return model


def _token_rows(n, C, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        y = i % C
        L = int(torch.randint(3, 10, (1,), generator=g))
        ids = torch.randint(4, 40, (L,), generator=g)
        ids[0] = 1 + y                        # the label is readable from the first token
        rows.append({"input_ids": ids.tolist(), "attention_mask": [1] * L, "token_type_ids": [0] * L, "label": y})
    return rows


def _hf_disk(folder, C=3):
    datasets = pytest.importorskip("datasets")
    split = {}
    for name, n, seed in (("train", 24, 0), ("test", 12, 1)):
        rows = _token_rows(n, C, seed)
        split[name] = datasets.Dataset.from_list(rows).cast_column(
            "label", datasets.ClassLabel(names=[f"topic{c}" for c in range(C)]))
    datasets.DatasetDict(split).save_to_disk(str(folder))


def test_hf_model_on_hf_disk_end_to_end(tmp_path):
    _tiny_bert(tmp_path / "bert")
    _hf_disk(tmp_path / "data")
    out = tmp_path / "out"
    assert main(["run", "--model", f"hf:{tmp_path / 'bert'}", "--dataset", "hf-disk", "--data-root",
                 str(tmp_path / "data"), "--m", "12", "--projector", "identity", "--exact",
                 "--gradient-distill", "local-global", "--budget", "2", "--quiet", "--out", str(out)]) == 0
    res = _results(out)
    _check_counts(res, 12, 12, 3)
    assert res["teacher"]["best_epoch"] is None       # the folder's weights are the teacher, not retrained
    assert res["exact"]["kernel_relative_error"] < 1e-5   # identity features of BERT on padded token batches
    # the stored training kernel against brute-force autograd on each chosen sequence cut to its own length
    transformers = pytest.importorskip("transformers")
    bert = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "bert").eval()
    train, _ = dntk.data.hf_disk(tmp_path / "data")
    idx = dntk.data.balanced_indices(train.labels, 12, 3, seed=0)
    X = take(train.inputs, idx)
    lens = X["attention_mask"].sum(1)

    def alone(i):
        return bert(**{k: v[i:i + 1, :lens[i]] for k, v in X.items()}).logits

    K = _brute(bert, alone, 12)
    folder = next(out.glob("features-train-*"))
    stored = dntk.store.FeatureStore(folder).read()
    assert rel(stored.kernel(), K) < 1e-4               # float32 model: rounding only
    assert torch.allclose(stored.logits, torch.cat([alone(i) for i in range(12)]).detach(), atol=1e-5)
    assert res["gradient_distillation"] is not None and (out / "figure2.png").exists()
    assert set(res["gradient_paths"]) >= {"factored", "closed"}
    # stage 1 on tokens: k-center on the teacher's features, kernel-greedy on its kernel; WMDD refused by name
    for method in ("kcenter", "kernel-greedy"):
        assert main(["run", "--model", f"hf:{tmp_path / 'bert'}", "--dataset", "hf-disk", "--data-root",
                     str(tmp_path / "data"), "--distill", method, "--ipc", "2", "--pool-factor", "2", "--k", "64",
                     "--quiet", "--out", str(out)]) == 0
        assert _results(out)["distillation"]["m"] == 6
    with pytest.raises(DNTKError, match="WMDD synthesises pixels"):
        dntk.run(dntk.RunConfig.from_options(model=f"hf:{tmp_path / 'bert'}", dataset="hf-disk",
                                             data_root=str(tmp_path / "data"), distill="wmdd", ipc=1,
                                             out=str(out), progress=False))
    # --max-length cuts every sequence; a missing model for token data is named
    assert main(["run", "--model", f"hf:{tmp_path / 'bert'}", "--dataset", "hf-disk", "--data-root",
                 str(tmp_path / "data"), "--max-length", "4", "--m", "6", "--k", "64", "--quiet", "--out",
                 str(tmp_path / "short")]) == 0
    assert main(["run", "--dataset", "hf-disk", "--data-root", str(tmp_path / "data"), "--quiet"]) == 1


def test_hf_folder_without_its_head_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=24, num_labels=3)
    transformers.BertModel(cfg).save_pretrained(tmp_path / "encoder")   # an encoder: no classification head
    with pytest.raises(DNTKError, match="lacks weights for classifier"):
        build_model_spec(f"hf:{tmp_path / 'encoder'}", 3)
    model = build_model_spec(f"hf:{tmp_path / 'encoder'}", 3, allow_new=True)   # --train-teacher always
    assert model.classifier.out_features == 3
    with pytest.raises(DNTKError, match="classifies 3 labels but the data has 4"):
        build_model_spec(f"hf:{tmp_path / 'encoder'}", 4)


def test_python_api_with_model_and_datasets(tmp_path):
    """dntk.run(config, model=, train_set=, test_set=) with a torch Dataset of variable-length token ids
    (padded per batch), and --base-model student from student=."""
    bert = _tiny_bert(tmp_path / "bert")
    transformers = pytest.importorskip("transformers")

    class Tokens(torch.utils.data.Dataset):
        def __init__(self, rows):
            self.rows = rows
            self.classes = ["a", "b", "c"]

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            r = self.rows[i]
            return {"input_ids": torch.tensor(r["input_ids"]), "attention_mask": torch.tensor(r["attention_mask"])}, \
                r["label"]

    train, test = Tokens(_token_rows(18, 3, 0)), Tokens(_token_rows(9, 3, 1))
    cfg = dntk.RunConfig.from_options(m=9, k=64, out=str(tmp_path / "api"), progress=False)
    res = dntk.run(cfg, model=bert, train_set=train, test_set=test)
    assert res.counts["per_sample_gradients"] == (9 + 9) * 3 and res.teacher["model"] == "object:BertForSequenceClassification"
    # the padded batches give the teacher accuracy of running every sequence alone
    with torch.no_grad():
        alone = [int(bert(**{k: v[None] for k, v in test[i][0].items()}).logits.argmax()) == test[i][1]
                 for i in range(len(test))]
    assert res.teacher["test_accuracy"] == pytest.approx(sum(alone) / len(alone), abs=1e-6)
    # a student needs a factory for a model object
    cfg2 = dntk.RunConfig.from_options(m=9, k=64, out=str(tmp_path / "api2"), distill="random", ipc=2,
                                       base_model="student", student_epochs=1)
    cfg2.progress = False
    with pytest.raises(DNTKError, match="needs student="):
        dntk.run(cfg2, model=bert, train_set=train, test_set=test)
    res2 = dntk.run(cfg2, model=bert, train_set=train, test_set=test,
                    student=lambda num_classes: transformers.BertForSequenceClassification(bert.config))
    assert res2.base_model["name"] == "student" and res2.kernel_model_teacher is not None


def test_hundred_classes(tmp_path):
    """C = 100 end to end: per-class kernels, stage 3 and figures with aggregate panels."""
    torch.manual_seed(0)
    C, d = 100, 12
    centres = torch.randn(C, d) * 3
    def make(n_per):
        y = torch.arange(C).repeat(n_per)
        return dntk.data.SampleSet(centres[y] + torch.randn(len(y), d), y, [f"c{c}" for c in range(C)], "blobs")
    train, test = make(2), make(1)
    model = nn.Sequential(nn.Linear(d, 32), nn.Tanh(), nn.Linear(32, C))
    cfg = dntk.RunConfig.from_options(m=100, k=128, out=str(tmp_path / "c100"), gradient_distill="local-global",
                                      budget=1, train_teacher="always", epochs=30, val_fraction=0.0,
                                      optimizer="adamw", train_batch_size=32)
    cfg.progress = False
    res = dntk.run(cfg, model=model, train_set=train, test_set=test)
    assert res.counts["classes"] == 100 and res.counts["per_sample_gradients"] == 200 * 100
    # trained (2 samples per class: none held out, the last epoch kept): 50× chance
    assert res.teacher["best_epoch"] == 30 and res.teacher["test_accuracy"] > 0.5
    assert len(res.gradient_distillation["local_global"]) == 100
    figs = sorted(p.name for p in (tmp_path / "c100").glob("figure4-class*.png"))
    assert len(figs) == 20                            # one file per class only for the first 20
    assert (tmp_path / "c100" / "figure2.png").exists()


def test_hf_gpt2_classifier_is_exact_and_its_conv1d_projections_take_the_addmm_rule():
    """GPT-2's projections are Hugging Face ``Conv1D`` (torch.addmm): with the addmm rule they are factored,
    not op-vjp, and the per-sample gradients of padded token batches match brute-force autograd."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=40, n_embd=16, n_layer=1, n_head=2, n_positions=32, num_labels=3,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=1)
    model = transformers.GPT2ForSequenceClassification(cfg).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 40, (4, 9), generator=g)
    mask = (torch.arange(9) < torch.tensor([9, 5, 7, 3])[:, None]).long()
    res = dntk.check_model(model, {"input_ids": ids * mask, "attention_mask": mask}, sketch=None)
    assert res.exact, res.refusal
    assert res.rules_taken.get("addmm", 0) >= 4        # c_attn, c_proj, c_fc, mlp c_proj
    conv1d = [p for p in res.per_parameter if ".attn.c_attn." in p["name"] or ".mlp.c_fc." in p["name"]]
    assert conv1d and all(p["path"] in ("factored", "closed") for p in conv1d)
