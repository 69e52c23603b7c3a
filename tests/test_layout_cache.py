"""The engine's per-call layout cache: measured once per call pattern, each later batch verified by two
weighted backward passes and one sample alone (GradientCapture._still_holds) instead of measured again —
with the same features as measuring every batch, and every batch that mixes samples still refused."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import dntk
from dntk.errors import DNTKError
from dntk.features import capture as cap
from dntk.models import build_model

from test_train_pipeline import SyncCounter


def _brute(model, X, proj_features_of):
    """Per-sample, per-logit gradients by plain autograd, one sample at a time: [C, n, P]."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(X.shape[0]):
        out = model(X[i:i + 1])[0]
        rows.append(torch.stack([torch.cat([(torch.zeros_like(p) if g is None else g).flatten() for p, g in
                                            zip(params, torch.autograd.grad(out[c], params, retain_graph=True,
                                                                            allow_unused=True))])
                                 for c in range(out.numel())]))
    return torch.stack(rows, 1)


def test_layouts_are_measured_once_and_later_batches_verified(captures, monkeypatch):
    """ResNet-18 (BatchNorm in eval, residual adds, pooling), 4 batches of 4: one measurement, three
    verified batches, features bit for bit those of measuring every batch (the cache refused by a
    patched _still_holds)."""
    torch.manual_seed(0)
    model = build_model("resnet18", 10, 3, 8, stem="small").eval()
    X = torch.randn(16, 3, 8, 8)
    proj = dntk.projection.make("tensorsketch", k=256, seed=0)
    cached = dntk.gradient_features(model, X, proj, progress=False, batch_size=4).features
    c = captures[-1]
    assert (c.measured, c.verified, c.remeasured) == (1, 3, 0)

    monkeypatch.setattr(cap.GradientCapture, "_still_holds", lambda self, *a: False)
    every = dntk.gradient_features(model, X, proj, progress=False, batch_size=4).features
    c = captures[-1]
    assert (c.measured, c.remeasured) == (4, 3)
    assert torch.equal(cached, every)


def test_cached_features_are_exact_on_a_small_model(captures):
    """An MLP with an identity projection: the cached batches' features equal plain autograd's per-sample
    gradients (a float64 model; the features are stored as float32, so to float32's rounding), the cache
    taken."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    X = torch.randn(24, 6, dtype=torch.float64)
    feats = dntk.gradient_features(model, X, dntk.projection.make("identity"), progress=False, batch_size=6).features
    assert captures[-1].verified == 3
    ref = _brute(model, X, None)
    assert torch.allclose(feats.double(), ref, rtol=1e-6, atol=1e-7 * float(ref.abs().max()))


class Sometimes(nn.Module):
    """Mixes the samples of a batch (adds the batch mean of a hidden layer) only on batches whose first
    input is large — the same call pattern as a batch that does not mix. detached: mix through a value
    the gradient cannot see."""

    def __init__(self, detached=False):
        super().__init__()
        self.l1, self.l2, self.detached = nn.Linear(4, 8), nn.Linear(8, 3), detached

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        if bool(x[:, 0].abs().max() > 50):
            m = h.mean(0, keepdim=True)
            h = h + (m.detach() if self.detached else m)
        return self.l2(h)


@pytest.mark.parametrize("detached", [False, True])
def test_a_later_batch_that_mixes_is_refused(captures, monkeypatch, detached):
    """Batch 1 does not mix (cached); batch 3 does: the verification sees it (through the weighted
    gradients, or — detached — the sample run alone), the batch is measured afresh and refused. Without
    the verification the same call returns features that are wrong (the negative control)."""
    torch.manual_seed(0)
    model = Sometimes(detached).double()
    X = torch.randn(24, 4, dtype=torch.float64)
    X[16, 0] = 100.0   # batch 3 (rows 16–23) mixes
    proj = dntk.projection.make("identity")
    with pytest.raises(DNTKError, match="interact|depends on the rest of its batch"):
        dntk.gradient_features(model, X, proj, progress=False, batch_size=8)
    assert captures[-1].remeasured == 1
    monkeypatch.setattr(cap.GradientCapture, "_still_holds", lambda self, *a: True)
    wrong = dntk.gradient_features(model, X, proj, progress=False, batch_size=8).features
    ref = _brute(model, X[16:17], None)   # sample 16 alone: the model's own gradient of that input
    assert not torch.allclose(wrong[:, 16:17].double(), ref, rtol=1e-3, atol=1e-4)


def test_token_batches_are_verified_with_every_sample_run_alone(captures):
    """Integer inputs: the layouts are cached like float ones (later batches verified, not measured), and
    every sample of every batch is still run alone; the features are those of brute-force autograd."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 5), nn.Flatten(), nn.Linear(15, 4)).double()
    ids = torch.randint(0, 11, (12, 3))
    feats = dntk.gradient_features(model, ids, dntk.projection.make("identity"), progress=False, batch_size=4).features
    c = captures[-1]
    assert (c.measured, c.verified, c.remeasured) == (1, 2, 0)
    ref = _brute(model, ids, None)
    assert torch.allclose(feats.double(), ref, rtol=1e-6, atol=1e-7 * float(ref.abs().max()))


class CountsOtherSamples(nn.Module):
    """A sample holding token 10 gets an offset from the number of samples in its batch holding token 7: an
    integer coupling no gradient sees, invariant under a permutation of the batch, and invisible in samples
    that hold no 10 (so in sample 0 here)."""

    def __init__(self):
        super().__init__()
        self.emb, self.head = nn.Embedding(11, 5), nn.Linear(15, 4)

    def forward(self, ids):
        h = self.emb(ids)
        sevens = (ids == 7).any(1).sum().to(h.dtype)
        return self.head((h + (ids == 10).any(1).to(h.dtype)[:, None, None] * sevens).flatten(1))


def test_token_coupling_in_a_verified_batch_is_refused(captures, monkeypatch):
    """The coupling sits in the third batch (verified from the cache) in a sample the verification's random
    single sample misses: refused, because every sample of a token batch runs alone. Without that (the
    negative control) the batch passes and its features are silently not the model's on single inputs."""
    import random

    torch.manual_seed(0)
    model = CountsOtherSamples().double()
    ids = torch.randint(0, 7, (12, 3))                  # no 7 or 10 anywhere ...
    j = random.Random(7919 + 3).randrange(1, 4)          # the sample still_holds runs alone in batch 3 (pass 3)
    t = 8 + next(i for i in (1, 2, 3) if i != j)         # ... but a 10 in another sample of batch 3
    ids[t, 0], ids[8 + ({1, 2, 3} - {j, t - 8}).pop(), 1] = 10, 7
    with pytest.raises(DNTKError, match="depends on the rest of its batch"):
        dntk.gradient_features(model, ids, dntk.projection.make("identity"), progress=False, batch_size=4)
    c = captures[-1]
    assert (c.measured, c.verified) == (1, 2)           # refused in a verified batch, not a measured one
    from dntk.features.capture import checks

    monkeypatch.setattr(checks, "integer_inputs", lambda x: False)   # verified with samples 0 and j alone only
    dntk.gradient_features(model, ids, dntk.projection.make("identity"), progress=False, batch_size=4)   # no error
    assert (captures[-1].measured, captures[-1].verified, captures[-1].remeasured) == (1, 2, 0)


def test_a_verified_batch_reads_back_once(captures, monkeypatch):
    """The host read-backs of a cached batch's capture: the verification's one (and none in the per-logit
    passes), against hundreds in a measured batch — the layout checks are one-off."""
    torch.manual_seed(0)
    model = build_model("resnet18", 10, 3, 8, stem="small").eval()
    X = torch.randn(8, 3, 8, 8)
    proj = dntk.projection.make("tensorsketch", k=256, seed=0)
    counts = []
    real = cap.GradientCapture._run_ops

    def watched(self, *a, **k):
        with SyncCounter() as c:
            out = real(self, *a, **k)
        counts.append(c.seen)
        return out

    monkeypatch.setattr(cap.GradientCapture, "_run_ops", watched)
    dntk.gradient_features(model, X, proj, progress=False, batch_size=4)
    first, second = counts
    assert len(first) > 100
    assert second.count("__bool__") == 1 and len([s for s in second if s not in ("numpy",)]) == 1, second


# ---- the review's cases (helper review of 81d0720): each was silently wrong or untested before --------

class CapacityMoE(nn.Module):
    """Switch-style top-1 mixture of experts with a fixed capacity per expert, filled in batch order: a
    token past its expert's capacity is dropped — so a sample's output depends on the samples before it,
    through integer routing the gradient cannot see, and never for sample 0."""

    def __init__(self, d=8, E=8, capacity=4):
        super().__init__()
        self.router = nn.Linear(d, E, bias=False)
        self.experts = nn.ModuleList(nn.Linear(d, d) for _ in range(E))
        self.head, self.capacity = nn.Linear(d, 3), capacity

    def forward(self, x):                                 # [B, T, d]
        B, T, d = x.shape
        t = x.reshape(B * T, d)
        gates = torch.softmax(self.router(t), -1)
        choice = gates.argmax(-1)
        out = t
        for e, expert in enumerate(self.experts):
            sel = choice == e
            keep = (sel & (torch.cumsum(sel.long(), 0) <= self.capacity)).to(t.dtype)
            out = out + (keep * gates[:, e]).unsqueeze(-1) * expert(t)
        return self.head(torch.tanh(out).reshape(B, T, d).mean(1))


def test_capacity_routing_on_a_later_batch_is_refused(captures):
    """Batch 1 is balanced (no token dropped, cached); batch 2 sends every token to expert 0, so samples
    1–7 are dropped in the batch but not alone: refused (the batch run in another order, or a sample other
    than 0 alone, shows it), not 76% off."""
    torch.manual_seed(0)
    model = CapacityMoE().double()
    with torch.no_grad():
        model.router.weight.copy_(torch.eye(8, dtype=torch.float64))
    B, T = 8, 4
    X = 0.3 * torch.randn(2 * B, T, 8, dtype=torch.float64)
    for b in range(B):
        for j in range(T):
            X[b, j, (4 * b + j) % 8] += 3.0
    X[B:, :, 0] += 3.0
    with pytest.raises(DNTKError, match="depends on the rest of its batch"):
        dntk.gradient_features(model, X, dntk.projection.make("identity"), progress=False, batch_size=B)
    assert captures[-1].remeasured == 1


class ShiftSometimes(nn.Module):
    """On batches with a large input each sample's hidden state gets the previous sample's (detached, or
    not) — sample 0 untouched."""

    def __init__(self, detached=True):
        super().__init__()
        self.l1, self.l2, self.detached = nn.Linear(4, 8), nn.Linear(8, 3), detached

    def forward(self, x):
        h = torch.tanh(self.l1(x))
        if bool(x.abs().max() > 50):
            prev = h[:-1].detach() if self.detached else h[:-1]
            h = torch.cat([h[:1], h[1:] + 0.5 * prev])
        return self.l2(h)


class DetachSometimes(nn.Module):
    """A large input anywhere in the batch stops the gradient of l1 for the whole batch; the logits are
    unchanged."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        h = self.l1(x)
        if bool(x.abs().max() > 50):
            h = h.detach()
        return self.l2(torch.tanh(h))


@pytest.mark.parametrize("model", [ShiftSometimes(True), ShiftSometimes(False), DetachSometimes()],
                         ids=["shift-detached", "shift", "detach"])
@pytest.mark.parametrize("first", [False, True], ids=["later-batch", "first-batch"])
def test_batch_dependent_coupling_away_from_sample_0_is_refused(model, first):
    """A trigger in sample 5 of a batch (not sample 0): the coupling — through a detached value, through the
    gradient, or a gradient cut with the logits unchanged — is refused whether it is in the first (measured)
    batch or a later (verified) one."""
    torch.manual_seed(0)
    model = model.double()
    X = torch.randn(16, 4, dtype=torch.float64)
    X[5 if first else 13, 1] = 60.0
    with pytest.raises(DNTKError, match="depends on the rest of its batch|samples of a batch interact"):
        dntk.gradient_features(model, X, dntk.projection.make("identity"), progress=False, batch_size=8)


class SometimesFlip(nn.Module):
    """On batches with a large input the batch is run in reverse order and put back: the same values, the
    same call shapes, another layout of the recorded outputs (no mixing)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, x):
        if bool(x.abs().max() > 50):
            idx = torch.arange(x.shape[0]).flip(0)
            return self.l2(torch.tanh(self.l1(x[idx]))[idx])
        return self.l2(torch.tanh(self.l1(x)))


def test_a_data_dependent_layout_is_remeasured_and_exact(captures, monkeypatch):
    """The flip on batch 2 leaves every value check passing; only the weighted gradients see that the cached
    layout no longer holds: the batch is measured afresh (an index map) and its features are exact. Served
    from the cache unverified, the same batch's features would be wrong (the negative control)."""
    torch.manual_seed(0)
    model = SometimesFlip().double()
    X = torch.randn(24, 4, dtype=torch.float64)
    X[13, 1] = 60.0
    feats = dntk.gradient_features(model, X, dntk.projection.make("identity"), progress=False, batch_size=8).features
    c = captures[-1]
    assert (c.measured, c.remeasured) == (2, 1)
    ref = _brute(model, X, None)
    assert torch.allclose(feats.double(), ref, rtol=1e-6, atol=1e-7 * float(ref.abs().max()))
    monkeypatch.setattr(cap.GradientCapture, "_still_holds", lambda self, *a: True)
    wrong = dntk.gradient_features(model, X, dntk.projection.make("identity"), progress=False, batch_size=8).features
    assert not torch.allclose(wrong.double(), ref, rtol=1e-3, atol=1e-4)


def test_outputs_no_gradient_reaches_do_not_stop_the_cache(captures):
    """An LSTM's unused h_n/c_n and a computed-but-unused branch are structurally unused: cached as such
    (later batches verified, not measured) and exact."""
    class SeqLSTM(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn, self.head, self.aux = nn.LSTM(4, 6), nn.Linear(6, 3), nn.Linear(4, 2)

        def forward(self, x):                           # [B, T, 4] → sequence-first inside
            self.aux(x)                                  # computed, unused
            h, _ = self.rnn(x.transpose(0, 1))
            return self.head(h[-1])

    torch.manual_seed(0)
    model = SeqLSTM().double()
    X = torch.randn(12, 5, 4, dtype=torch.float64)
    feats = dntk.gradient_features(model, X, dntk.projection.make("identity"), progress=False, batch_size=4).features
    c = captures[-1]
    assert (c.measured, c.verified, c.remeasured) == (1, 2, 0)
    ref = _brute(model, X, None)
    assert torch.allclose(feats.double(), ref, rtol=1e-6, atol=1e-7 * float(ref.abs().max()))
