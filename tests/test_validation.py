"""#28 "Reliability at the edges", cases 11–14: one validation layer (dntk.validate) — nonsense values
refused by name instead of silently replaced, numerics that report when float64 cannot answer, store
reads that check their range, projector and checksums, and engine messages that say what is wrong.
Every test fails on the code before this change (acc1f7a)."""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dntk
from dntk import metrics
from dntk.errors import DNTKError
from dntk.gradient_distillation import distill_gradients, hybrid, local_global, select, target_direction
from dntk.kernels import PerClassKRR

SRC = str(Path(__file__).resolve().parents[1] / "src")
FAST = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _features(C=2, m=12, k=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(C, m, k, generator=g, dtype=torch.float64) / k ** 0.5,
            torch.randn(m, C, generator=g, dtype=torch.float64))


def _spd(m, cond, seed=0):
    """A symmetric positive-definite [m, m] with eigenvalues log-spaced from 1 down to 1/cond (known exactly)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    lam = torch.logspace(0, -float(np.log10(cond)), m, dtype=torch.float64)
    K = (Q * lam) @ Q.T
    return (K + K.T) / 2, Q, lam


def _linear(C=3):
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, C))


# --- case 11: stage-3 budgets, ridges and seeds ------------------------------------------------------------
def test_stage3_budgets_ridges_and_seeds_are_refused_not_replaced():
    """budget=-1 sliced one off per class, budget=0 gave empty sets, distill_gradients("target-direction",
    budget=0) silently used 1, negative ridges were accepted and seed=1.7 was used as 1."""
    F_, Y = _features()
    for b in (-1, 0, True, 2.0):
        with pytest.raises(DNTKError, match=rf"local_global: budget s must be an integer ≥ 1, got {b!r}"):
            local_global(F_, Y, budget=b, n_clusters=2)
    with pytest.raises(DNTKError, match="distill_gradients: budget must be an integer ≥ 1, got 0"):
        distill_gradients("target-direction", F_, Y, budget=0)
    for fn in (lambda: target_direction(F_, Y, 1, ridge=-1e-3), lambda: hybrid(F_, Y, 2, ridge=-1e-3, n_clusters=2),
               lambda: distill_gradients("random", F_, Y, budget=2, ridge=-1.0)):
        with pytest.raises(DNTKError, match=r"ridge must be a finite real number ≥ 0, got -"):
            fn()
    for fn in (lambda: select(F_, Y, 3, "random", seed=1.7), lambda: local_global(F_, Y, budget=2, n_clusters=2, seed=1.7),
               lambda: distill_gradients("fps", F_, Y, budget=2, seed=1.7)):
        with pytest.raises(DNTKError, match=r"seed must be an integer ≥ 0, got 1.7"):
            fn()
    # a numpy integer is an integer: accepted, with exactly that many gradients per class
    assert select(F_, Y, np.int64(3), "random").sizes == [3, 3]
    assert distill_gradients("target-direction", F_, Y).sizes == [1, 1]   # None still means the documented s = 1


def test_leverage_selection_uses_the_given_ridge():
    """distill_gradients ignored ``ridge`` for leverage (always 1e-4); reference: numpy ridge leverage scores
    of the trace-normalised kernel and the same seeded sampling."""
    F_, Y = _features(m=20, k=8)
    ridge, s = 3.0, 5
    dg = distill_gradients("leverage", F_, Y, budget=s, ridge=ridge, seed=0)
    for c in range(2):
        K = (F_[c] @ F_[c].T).numpy()
        Kt = K / np.mean(np.diag(K))
        score = np.diag(Kt @ np.linalg.inv(Kt + ridge * np.eye(20)))
        ref = np.random.default_rng([0, c]).choice(20, size=s, replace=False, p=score / score.sum()).tolist()
        assert dg.record["indices"][c] == ref


# --- case 12: numerical honesty ------------------------------------------------------------------------------
def test_nan_and_zero_targets_are_named():
    """NaN targets gave NaN KRR predictions and, in stage 3, a misleading "all targets zero?"."""
    F_, Y = _features()
    Y_nan = Y.clone()
    Y_nan[3, 1] = float("nan")
    with pytest.raises(DNTKError, match=r"targets of class 1 contains NaN or inf \(rows \[3\]\)"):
        PerClassKRR().fit(F_, Y_nan)
    for fn in (lambda: target_direction(F_, Y_nan, 1, ridge=1e-3), lambda: hybrid(F_, Y_nan, 2, ridge=1e-3, n_clusters=2),
               lambda: local_global(F_, Y_nan, n_clusters=2)):
        with pytest.raises(DNTKError, match=r"targets contain NaN or inf in rows \[3\]"):
            fn()
    Y0 = Y.clone()
    Y0[:, 0] = 0
    with pytest.raises(DNTKError, match="the targets of class 0 are all zero"):
        target_direction(F_, Y0, 1, ridge=1e-3)


def test_empirical_ntk_refuses_a_nan_input_like_gradient_features():
    m = _linear()
    x = torch.randn(5, 3, 2, 2)
    x[2, 0, 0, 0] = float("nan")
    with pytest.raises(DNTKError, match=r"non-finite gradients or logits for sample indices \[2\]"):
        dntk.empirical_ntk(m, x, batch_size=2)
    with pytest.raises(DNTKError, match=r"sample indices \[2\]"):   # in x2 only
        dntk.empirical_ntk(m, torch.randn(2, 3, 2, 2), x, batch_size=4)
    with pytest.raises(DNTKError, match=r"sample indices \[2\]"):
        dntk.features.sliced_class_kernels(m, x)


def test_an_ill_conditioned_solve_warns_with_its_true_condition_number():
    """At condition 1e16 and ridge 0 the dual solution was 18 % off without a word. Reference: the exact
    inverse Q Λ⁻¹ Qᵀ y from the eigenvalues the kernel was built from."""
    y = torch.randn(40, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for cond in (1e14, 1e16):
        K, Q, lam = _spd(40, cond)
        with pytest.warns(RuntimeWarning, match="condition number ≈") as rec:
            model = PerClassKRR(ridge=0, normalize=None).fit_kernel(K[None], y)
        said = float(re.search(r"condition number ≈ ([0-9.e+]+)", str(rec[0].message)).group(1))
        if cond == 1e14:
            assert cond / 3 < said < cond * 3      # the true condition, not a floored one
        else:
            assert said > 1e15                     # beyond float64: at least its floor ≈ 4.5e15 is reported
        exact = Q @ ((Q.T @ y[:, 0]) / lam)
        assert float((model.fits_[0].coef - exact).norm() / exact.norm()) > 1e-6   # the result really is off
    K, Q, lam = _spd(40, 1e4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")             # a well-conditioned solve stays silent
        model = PerClassKRR(ridge=0, normalize=None).fit_kernel(K[None], y)
    exact = Q @ ((Q.T @ y[:, 0]) / lam)
    assert float((model.fits_[0].coef - exact).norm() / exact.norm()) < 1e-10


def test_kernel_conditioning_reports_the_true_value_and_refuses_a_negative_kernel():
    """It clamped eigenvalues at 1e-12 (a 1e14 kernel read ≈ 1e12) and reported 1.0 for −K."""
    K, _, _ = _spd(30, 1e14)
    got = metrics.kernel_conditioning(K, normalize=None)
    assert got["condition_number"] == pytest.approx(1e14, rel=0.05) and got["per_class"][0]["resolved"]
    assert metrics.kernel_conditioning(K.numpy(), normalize=None)["condition_number"] == got["condition_number"]
    singular = metrics.kernel_conditioning(torch.diag(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64)), normalize=None)
    assert singular["condition_number"] == pytest.approx(1 / 2.220446049250313e-16) and not \
        singular["per_class"][0]["resolved"]
    for bad in (-K, K - 0.5 * torch.eye(30, dtype=torch.float64)):
        with pytest.raises(DNTKError, match="is (negative|indefinite).*not a Gram matrix"):
            metrics.kernel_conditioning(bad)
    with pytest.raises(DNTKError, match="square and non-empty"):
        metrics.kernel_conditioning(torch.zeros(0, 0))


# --- case 13: the store ----------------------------------------------------------------------------------
N, SHARD = 20, 6


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    X = torch.randn(N, 3, 2, 2)
    proj = dntk.projection.make("sjlt", k=8, seed=0)
    folder = tmp_path_factory.mktemp("store") / "s"
    st_ = dntk.store.FeatureStore(folder, shard=SHARD)
    st_.extract(model, X, proj, progress=False)
    ref = dntk.gradient_features(model, X, proj, progress=False)   # the same features, not through the store
    return st_, ref, proj, folder


@FAST
@given(start=st.one_of(st.none(), st.integers(-25, 30)), stop=st.one_of(st.none(), st.integers(-25, 30)))
def test_store_reads_equal_numpy_slicing_or_are_refused(store, start, stop):
    """read(-3) returned every row and read(-3, 2) rows 0–1 (Python slicing), reads past the end raised
    raw numpy errors. Valid: 0 ≤ start < stop ≤ n (stop None = n)."""
    st_, ref, _, _ = store
    args = {"start": 0 if start is None else start, "stop": stop}
    lo, hi = args["start"], N if stop is None else stop
    if 0 <= lo < hi <= N:
        got = st_.read(**args)
        assert np.array_equal(got.features.numpy(), ref.features.numpy()[:, lo:hi])
        assert np.array_equal(got.logits.numpy(), ref.logits.numpy()[lo:hi])
        assert np.array_equal(st_.read_class(1, **args).numpy(), ref.features.numpy()[1, lo:hi])
        assert np.array_equal(st_.read_logits(**args).numpy(), ref.logits.numpy()[lo:hi])
    else:
        for fn in (st_.read, st_.read_logits, lambda **a: st_.read_class(0, **a)):
            with pytest.raises(DNTKError, match=r"start|stop"):
                fn(**args)


def test_store_indices_and_projector_are_checked(store):
    st_, ref, proj, _ = store
    for bad in ("a", 1.5, True):
        with pytest.raises(DNTKError, match=rf"read: start must be an integer ≥ 0, got {re.escape(repr(bad))}"):
            st_.read(bad)
    with pytest.raises(DNTKError, match="read_class: c=3 is out of range for a store of C=3"):
        st_.read_class(3)
    with pytest.raises(DNTKError, match="read_class: c must be an integer ≥ 0, got -1"):
        st_.read_class(-1)
    assert st_.read(projector=proj).projector is proj
    for other, what in ((dntk.projection.make("sjlt", k=8, seed=1), "seed 1 vs 0"),
                        (dntk.projection.make("sjlt", k=16, seed=0), "k 16 vs 8"),
                        (dntk.projection.make("gaussian", k=8, seed=0), "name 'gaussian' vs 'sjlt'")):
        with pytest.raises(DNTKError, match=f"differs from the one these features were made with.*{what}"):
            st_.read(projector=other)


def test_a_bad_shard_is_named_with_its_file_and_the_fix(store, tmp_path):
    import shutil

    _, ref, _, folder = store
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    path = copy / "shard-000002.logits.npy"
    data = bytearray(path.read_bytes())
    data[-4] ^= 0xFF
    path.write_bytes(bytes(data))
    fresh = dntk.store.FeatureStore(copy)
    # the shards a read opens are verified: rows 0..11 (shards 0, 1) are still served exactly
    assert torch.equal(fresh.read(0, 12).features, ref.features[:, :12])
    with pytest.raises(DNTKError, match=r"shard 2: shard-000002\.logits\.npy: SHA-1 differs from the one "
                                        r"shard-000002\.json records.*rerun the extraction.*or delete"):
        fresh.read(10, 14)


SLOW_EXTRACT = """
import sys, time, torch, torch.nn as nn, dntk
class Slow(nn.Module):
    def __init__(self):
        super().__init__(); self.l = nn.Linear(12, 3)
    def forward(self, x):
        time.sleep(0.15)
        return self.l(x.flatten(1))
torch.manual_seed(0)
model, X = Slow(), torch.randn(16, 3, 2, 2)
dntk.store.FeatureStore(sys.argv[1], shard=4).extract(model, X, dntk.projection.make("sjlt", k=8, seed=0),
                                                       batch_size=2, progress=False)
"""


def test_a_second_concurrent_extraction_into_one_folder_is_refused(tmp_path):
    """Two different extractions started at once into one new folder both "succeeded" and left 0–40 of
    40 shards complete."""
    folder = tmp_path / "s"
    holder = subprocess.Popen([sys.executable, "-c", SLOW_EXTRACT, str(folder)], env={"PYTHONPATH": SRC, "PATH": ""})
    try:
        lock = folder / ".dntk.lock"
        t0 = time.time()
        while not (lock.exists() and "pid" in lock.read_text()) and time.time() - t0 < 60:
            time.sleep(0.05)
        torch.manual_seed(1)
        other = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
        with pytest.raises(DNTKError, match=rf"in use by another dntk job \(pid {holder.pid}"):
            dntk.store.FeatureStore(folder, shard=4).extract(other, torch.randn(16, 3, 2, 2),
                                                             dntk.projection.make("sjlt", k=8, seed=0), progress=False)
        assert holder.wait(timeout=120) == 0
    finally:
        holder.kill()
    # the first extraction is whole and is exactly its own features
    class Same(nn.Module):   # the holder's model without its sleep: same parameter names, same weights
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(12, 3)

        def forward(self, x):
            return self.l(x.flatten(1))

    torch.manual_seed(0)
    model = Same()
    ref = dntk.gradient_features(model, torch.randn(16, 3, 2, 2), dntk.projection.make("sjlt", k=8, seed=0),
                                 progress=False)
    done = dntk.store.FeatureStore(folder)
    assert done.missing() == []
    assert torch.allclose(done.read().features, ref.features, rtol=1e-5, atol=1e-7)


# --- case 14: engine messages and raw errors ----------------------------------------------------------------
class _Dropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.l = nn.Linear(4, 3)

    def forward(self, x):
        return self.l(F.dropout(x, 0.5, training=True))


class _Noise(_Dropout):
    def forward(self, x):
        return self.l(x + torch.randn_like(x))


class _OwnGenerator(_Dropout):
    def __init__(self):
        super().__init__()
        self.g = torch.Generator().manual_seed(0)

    def forward(self, x):
        return self.l(x + torch.randn(x.shape, generator=self.g))


@pytest.mark.parametrize("kind", [_Dropout, _Noise, _OwnGenerator])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_a_random_forward_is_refused_as_random(kind, batch_size):
    """Refused as "depends on the rest of its batch … use batch_size=1", whose advice returned random features."""
    with pytest.raises(DNTKError, match=r"the forward is random .*call model.eval\(\)") as err:
        dntk.gradient_features(kind(), torch.randn(4, 4), "identity", batch_size=batch_size, progress=False)
    assert "batch_size=1" not in str(err.value)


def test_the_compiled_code_hint_only_for_compiled_models():
    eager = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(DNTKError, match="mat1 and mat2") as err:
        dntk.gradient_features(eager, torch.randn(2, 6), "identity", progress=False)
    assert "compiled" not in str(err.value) and "shape and dtype the model expects" in str(err.value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # torch.jit.trace is deprecated
        traced = torch.jit.trace(eager, torch.randn(2, 4))
    with pytest.raises(DNTKError, match=r"the model \(.*\) is compiled, scripted or traced code"):
        dntk.gradient_features(traced, torch.randn(2, 6), "identity", progress=False)


def test_numpy_inputs_are_accepted_and_equal_the_tensor_results():
    F_, Y = _features()
    K = F_ @ F_.transpose(1, 2)
    assert torch.equal(dntk.kernels.class_scale(features=F_.numpy()), dntk.kernels.class_scale(features=F_))
    assert dntk.spectral.truncation_rank(np.array([3.0, 1.0, 0.5]), 0.85) == 2   # 4/4.5 ≥ 0.85
    assert torch.allclose(dntk.spectral.eigh_desc(K[0].numpy())[0], dntk.spectral.eigh_desc(K[0])[0])
    assert torch.allclose(PerClassKRR().fit(F_.numpy(), Y.numpy()).predict(F_.numpy()),
                          PerClassKRR().fit(F_, Y).predict(F_))
    assert torch.allclose(PerClassKRR().fit_kernel(K.numpy(), Y).predict_kernel(K.numpy()),
                          PerClassKRR().fit_kernel(K, Y).predict_kernel(K))
    assert metrics.kernel_relative_error(K.numpy(), K.numpy()) == 0.0
    assert local_global(F_.numpy(), Y.numpy(), budget=2, n_clusters=2).sizes == [2, 2]
    assert torch.equal(dntk.kernels.one_hot(np.array([0, 2]), 3), torch.tensor([[1.0, 0, 0], [0, 0, 1]],
                                                                                 dtype=torch.float64))
    rows = dntk.kernels.compare_with_exact(Y.numpy(), Y, None, {"copy": {"pred": Y.numpy()}})
    assert rows[1]["agreement_with_exact"] == 1.0 and rows[1]["relative_mse_to_exact"] == 0.0
    m, x = _linear(), torch.randn(4, 3, 2, 2, dtype=torch.float32)
    assert torch.equal(dntk.empirical_ntk(m, x.numpy()), dntk.empirical_ntk(m, x))


def _raw_error_cases():
    F_, Y = _features()
    K = F_ @ F_.transpose(1, 2)
    fitted = PerClassKRR().fit(F_, Y)
    meta = nn.Linear(12, 3).to("meta")
    return {  # name → (call, what its message must name); each raised AttributeError/IndexError/... before
        "kernel_conditioning(empty)": (lambda: metrics.kernel_conditioning(torch.zeros(0, 0)), "non-empty"),
        "kernel_alignment(zero kernel)": (lambda: metrics.kernel_alignment(torch.zeros(3, 3), torch.eye(3)), "all zero"),
        "kernel_relative_error(zero reference)": (lambda: metrics.kernel_relative_error(torch.eye(3), torch.zeros(3, 3)),
                                                  "all zero"),
        "PerClassKRR(ridge='a')": (lambda: PerClassKRR(ridge="a"), "ridge must be a finite real number"),
        "PerClassKRR(rank=True)": (lambda: PerClassKRR(rank=True), "rank must be an integer"),
        "train_kernel(9)": (lambda: fitted.train_kernel(9), "c=9 is out of range"),
        "predict(NaN features)": (lambda: fitted.predict(F_ * float("nan")), "test features of class 0 contains NaN"),
        "one_hot(out of range)": (lambda: dntk.kernels.one_hot(torch.tensor([0, 5]), 3), "labels must lie in 0..2"),
        "own_class_blocks(labels=None)": (lambda: dntk.spectral.own_class_blocks(K, None), "labels must be"),
        "local_global_structure(n_clusters=1.0)": (lambda: dntk.spectral.local_global_structure(K[0], 1.0),
                                                   "n_clusters must be an integer"),
        "select(list features)": (lambda: select(F_.tolist(), Y, 2), "features must be a torch tensor or a numpy array"),
        "local_global(Y 1-D)": (lambda: local_global(F_, Y[:, 0], n_clusters=2), "targets must have 2 dimensions"),
        "ridge_leverage_scores(str ridge)": (lambda: dntk.gradient_distillation.ridge_leverage_scores(K[0], "x"), "ridge must be"),
        "gradient_features(classes='a')": (lambda: dntk.gradient_features(_linear(), torch.randn(2, 12), "identity",
                                                                          classes="a", progress=False), "classes must be"),
        "gradient_features(meta model)": (lambda: dntk.gradient_features(meta, torch.randn(2, 12), "identity",
                                                                         progress=False), "meta device"),
        "empirical_ntk(meta model)": (lambda: dntk.empirical_ntk(meta, torch.randn(2, 12)), "meta device"),
        "krr_curve(m_values=[0])": (lambda: dntk.kernels.krr_curve(Y, Y, None, ridge=1e-3, m_values=[0],
                                                                    kernels=(K, K)), "an m value must be an integer ≥ 1"),
        "posterior_variance(ridge=-1)": (lambda: dntk.gradient_distillation.posterior_variance(F_[0], F_[0], -1.0), "ridge must be"),
        "gp_prior_targets(seed=1.7)": (lambda: dntk.gradient_distillation.gp_prior_targets(F_, F_, seed=1.7), "seed must be"),
        "principal_angles(r=0)": (lambda: dntk.gradient_distillation.principal_angles(F_, select(F_, Y, 2), r=0), "r must be"),
        "accuracy(1-D predictions)": (lambda: metrics.accuracy(torch.randn(5), torch.zeros(5, dtype=torch.long)),
                                      "not their argmax"),
    }


@pytest.mark.parametrize("case", list(_raw_error_cases()))
def test_public_functions_refuse_bad_input_by_name(case):
    call, named = _raw_error_cases()[case]
    with pytest.raises(DNTKError, match=re.escape(named)):
        call()


# --- property-based: metrics, KRR, stage-3 budgets --------------------------------------------------------
@FAST
@given(n=st.integers(1, 12), C=st.integers(1, 5), seed=st.integers(0, 2**16), nan_rows=st.integers(0, 3),
       form=st.sampled_from(["tensor", "column", "numpy", "list"]))
def test_accuracy_and_fidelity_match_a_numpy_reference(n, C, seed, nan_rows, form):
    rng = np.random.default_rng(seed)
    p, f = rng.normal(size=(n, C)), rng.normal(size=(n, C))
    p[rng.choice(n, size=min(nan_rows, n), replace=False), rng.integers(C)] = np.nan
    y = rng.integers(0, C, size=n)
    ok = ~np.isnan(p).any(1)
    ref_acc = float(np.mean(ok & (np.nanargmax(np.where(np.isnan(p), -np.inf, p), 1) == y)))
    ref_fid = float(np.mean(ok & (np.argmax(np.where(np.isnan(p), -np.inf, p), 1) == np.argmax(f, 1))))
    labels = {"tensor": torch.from_numpy(y), "column": torch.from_numpy(y)[:, None], "numpy": y, "list": y.tolist()}[form]
    assert metrics.accuracy(torch.from_numpy(p), labels) == pytest.approx(ref_acc)
    assert metrics.fidelity(p, f) == pytest.approx(ref_fid)
    assert metrics.fidelity(f, f) == 1.0
    if C > 1:
        with pytest.raises(DNTKError, match="argmax"):
            metrics.accuracy(p, np.eye(C, dtype=np.int64)[y])
    with pytest.raises(DNTKError, match="must lie in"):
        metrics.accuracy(p, y + C)
    # kernel comparisons take numpy arrays too (they raised AttributeError): against the numpy formulas
    A, B = rng.normal(size=(C, n, n)), rng.normal(size=(C, n, n))
    ref_err = np.mean([np.linalg.norm(A[c] - B[c]) / np.linalg.norm(B[c]) for c in range(C)])
    ref_align = np.mean([(A[c] * B[c]).sum() / (np.linalg.norm(A[c]) * np.linalg.norm(B[c])) for c in range(C)])
    assert metrics.kernel_relative_error(A, B) == pytest.approx(ref_err, rel=1e-12)
    assert metrics.kernel_alignment(A, B) == pytest.approx(ref_align, rel=1e-12, abs=1e-15)


@FAST
@given(m=st.integers(1, 15), C=st.integers(1, 3), log_cond=st.floats(0, 6), ridge=st.floats(0, 10),
       seed=st.integers(0, 2**16), as_numpy=st.booleans())
def test_krr_solution_equals_a_dense_numpy_solve(m, C, log_cond, ridge, seed, as_numpy):
    """Random SPD kernels (condition ≤ 1e6), any ridge ≥ 0, given as tensors or numpy arrays (refused
    before): the dual solution is numpy's dense float64 solve."""
    Ks = torch.stack([_spd(m, 10 ** log_cond, seed + c)[0] for c in range(C)])
    Y = torch.from_numpy(np.random.default_rng(seed).normal(size=(m, C)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")             # well-conditioned: no warning
        model = PerClassKRR(ridge=np.float64(ridge) if as_numpy else ridge, normalize=None).fit_kernel(
            Ks.numpy() if as_numpy else Ks, Y.numpy() if as_numpy else Y)
    for c in range(C):
        ref = np.linalg.solve(Ks[c].numpy() + ridge * np.eye(m), Y[:, c].numpy())
        assert np.allclose(model.fits_[c].coef.numpy(), ref, rtol=1e-8, atol=1e-10 * np.abs(ref).max())
    with pytest.raises(DNTKError, match="ridge must be a finite real number ≥ 0"):
        PerClassKRR(ridge=-ridge - 1e-9)


@settings(max_examples=10, deadline=None)
@given(budget=st.integers(1, 12), method=st.sampled_from(["local-global", "random", "fps", "leverage", "hybrid"]),
       kind=st.sampled_from([int, np.int64, np.int32]))
def test_any_budget_up_to_m_gives_exactly_that_many_gradients(budget, method, kind):
    """With full-rank class kernels (k > m) every method returns exactly s = budget gradients per class for
    1 ≤ s ≤ m, the budget a Python or numpy integer (the selections refused numpy integers); s > m is
    refused by name."""
    F_, Y = _features(m=12, k=20)
    dg = distill_gradients(method, F_, Y, budget=kind(budget), n_clusters=2)
    assert dg.sizes == [budget, budget]
    with pytest.raises(DNTKError, match="budget s=13 is larger than the m=12"):
        distill_gradients(method, F_, Y, budget=13, n_clusters=2)


@settings(max_examples=12, deadline=None)
@given(budget=st.one_of(st.integers(-5, 0), st.floats(0.5, 5.5), st.booleans(), st.just("3")),
       method=st.sampled_from(["local-global", "random", "kmeans", "target-direction", "hybrid"]))
def test_any_nonpositive_or_non_integer_budget_is_refused(budget, method):
    F_, Y = _features(m=12, k=20)
    with pytest.raises(DNTKError, match=r"budget must be an integer ≥ 1, got"):
        distill_gradients(method, F_, Y, budget=budget, n_clusters=2)
