"""Every verdict of every claim rule in dntk.report.claims, driven through a table of hand-made
results: the boundaries of each rule (where 'yes' turns 'close' or 'no') come from PAPER / RULES, so a
changed threshold or a flipped comparison fails here."""

import pytest

from dntk.pipeline.stage3 import FIG3_COMPRESSIONS
from dntk.report import claims as C
from dntk.spectral import ALL_POINTS, OWN_CLASS

M = 500


def _res(ranks=None, own=None, gap=None, unc=None, at100=None):
    gd = {"ranks": {ALL_POINTS: ranks or [], OWN_CLASS: own or []}, "local_global": [], "figure3_rows": []}
    if gap is not None:
        gd["local_global"] = [{"gap_variance_fraction": gap, "uncovered_variance_fraction": unc}]
    if at100 is not None:
        gd["figure3_rows"] = [{"s": M // 100, "method": "local-global", "accuracy": at100[0], "fidelity": at100[1]},
                              {"s": M // 100, "method": "random", "accuracy": 0.99, "fidelity": 0.99}]
    return {"counts": {"m": M}, "gradient_distillation": gd}


def _student(gap_acc=None):
    if gap_acc is None:
        return {"kernel_model": {"accuracy": 0.6, "fidelity": 0.6}}
    return {"kernel_model": {"accuracy": 0.6, "fidelity": 0.6},
            "kernel_model_teacher": {"accuracy": 0.6 + gap_acc, "fidelity": 0.7},
            "teacher": {"test_accuracy": 0.8}, "base_model": {"test_accuracy": 0.7}}


def _costs(flops=None, storage=1e4, kernel=1e4):
    if flops is None:
        return {"reductions": {}}
    return {"reductions": {C.FLOPS_KEY: flops, C.STORAGE_KEY: storage, C.KERNEL_KEY: kernel}}


def _verdict(prefix, res_t=None, res_s=None, costs=None):
    out = C.claims(res_t or _res(), res_s or _student(), costs or _costs())
    found = [c for c in out if c["claim"].startswith(prefix)]
    return found[0]["holds"] if found else None


lo, hi = C.PAPER["truncation_ranks"]
sl = C.RULES["rank_slack"]
g_lo, g_hi = C.PAPER["coverage_gap"]
gs = C.RULES["coverage_slack"]
acc, fid, a_sl = C.PAPER["accuracy_100x"], C.PAPER["fidelity_100x"], C.RULES["at_100x_slack"]
b_lo, b_hi = C.RULES["base_model_gap"]
orders = C.RULES["orders"]

CASES = [
    # (i) truncation ranks
    ("(i) ", dict(res_t=_res(ranks=[lo, hi])), "yes"),
    ("(i) ", dict(res_t=_res(ranks=[lo - sl, hi])), "close"),
    ("(i) ", dict(res_t=_res(ranks=[lo, hi + sl + 1])), "no"),
    ("(i) ", dict(res_t=_res(ranks=[lo - 20, hi + 20], own=[lo + 1, hi - 1])), "only for the own-class blocks"),
    ("(i) ", dict(res_t=_res(ranks=[lo - 20, hi], own=[lo - 20, hi])), "no"),
    ("(i) ", dict(res_t=_res()), None),                                     # no ranks: no claim
    # (ii) coverage: either mean decides
    ("(ii)", dict(res_t=_res(gap=(g_lo + g_hi) / 2, unc=0.9)), "yes"),
    ("(ii)", dict(res_t=_res(gap=0.9, unc=g_hi)), "yes"),
    ("(ii)", dict(res_t=_res(gap=g_lo - gs / 2, unc=0.9)), "close"),
    ("(ii)", dict(res_t=_res(gap=g_hi + 2 * gs, unc=g_lo - 2 * gs)), "no"),
    # (iii) the 100x point: both at most the slack below the paper's
    ("(iii", dict(res_t=_res(at100=(acc - a_sl, fid - a_sl))), "yes"),
    ("(iii", dict(res_t=_res(at100=(acc + 0.1, fid + 0.1))), "yes"),
    ("(iii", dict(res_t=_res(at100=(acc - a_sl - 1e-3, fid))), "no"),
    ("(iii", dict(res_t=_res(at100=(acc, fid - a_sl - 1e-3))), "no"),
    # (iv) the base-model gap, inclusive bounds
    ("(iv)", dict(res_s=_student(gap_acc=b_lo)), "yes"),
    ("(iv)", dict(res_s=_student(gap_acc=(b_lo + b_hi) / 2)), "yes"),
    ("(iv)", dict(res_s=_student(gap_acc=b_lo - 0.01)), "no"),
    ("(iv)", dict(res_s=_student(gap_acc=b_hi + 0.01)), "no"),
    ("(iv)", dict(res_s=_student()), None),
    # (v) orders of magnitude: all, some, none
    ("(v) ", dict(costs=_costs(orders, orders, orders)), "yes"),
    ("(v) ", dict(costs=_costs(orders - 1, orders, orders)), "partly"),
    ("(v) ", dict(costs=_costs(1.0, 2.0, orders - 1)), "no"),
    ("(v) ", dict(costs=_costs()), None),
]


@pytest.mark.parametrize("prefix,kw,expected", CASES, ids=[f"{c[0].strip()}-{i}" for i, c in enumerate(CASES)])
def test_every_claim_verdict(prefix, kw, expected):
    assert _verdict(prefix, **kw) == expected


def test_claims_quote_the_thresholds_they_use():
    out = C.claims(_res(ranks=[lo, hi], gap=0.13, unc=0.13, at100=(acc, fid)), _student(0.1), _costs(1e3))
    assert [c["claim"][:4] for c in out] == ["(i) ", "(ii)", "(iii", "(iv)", "(v) "]
    assert f"{lo}–{hi}" in out[0]["rule"] and f"within {sl}" in out[0]["rule"]
    assert f"{100 * acc:.0f}% accuracy" in out[2]["claim"] and f"within {100 * a_sl:.0f} points" in out[2]["rule"]


def test_algorithm1_rows_pick_the_paper_compressions():
    assert C.COMPRESSIONS == FIG3_COMPRESSIONS
    res = {"counts": {"m": M}, "gradient_distillation": {"figure3_rows": [
        {"s": s, "method": "local-global"} for s in (1, 5, 10, 25, 50)]}}
    rows = C.algorithm1_rows(res)
    assert [(r["target_compression"], r["s"]) for r in rows] == [(20, 25), (50, 10), (100, 5)]
