"""benchmarks/compare_results.py (the field-by-field check behind #23's "behaviour unchanged"): renamed keys
are mapped, the run's own --out folder does not count as a difference, machine fields are set apart — and a
changed number, a missing field and an added one are each reported."""
import importlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
cr = importlib.import_module("compare_results")
sys.path.remove(str(ROOT / "benchmarks"))


def _run(out, fid=0.9978, extra=None):
    d = {"config": {"out": out, "seed": 0}, "teacher": {"source": f"{out}/teacher/best.pt"},
         "kernel_model": {"fidelity": fid, "ranks": {"per-logit kernel, all m points": [3, 4]}},
         "timings_s": {"teacher": 1.0}, "environment": {"dntk": "0.1.0+abc", "threads": 2}}
    d.update(extra or {})
    return d


def test_identical_runs_in_two_folders_compare_equal():
    old = _run("/a/old")
    new = _run("/b/new")
    new["kernel_model"]["ranks"] = {"all_points": [3, 4]}          # renamed by #23
    new["timings_s"]["teacher"] = 9.0                               # machine
    new["environment"]["dntk"] = "0.1.0+def"
    res = cr.compare(old, new)
    assert not res["differ"] and not res["only_old"] and not res["only_new"]
    assert res["compared"] == res["equal"] == 7 and res["machine"] == 2


def test_a_changed_number_a_lost_and_an_added_field_are_reported():
    old, new = _run("/a"), _run("/b", fid=0.9977, extra={"added": 1})
    del new["environment"]["threads"]
    res = cr.compare(old, new)
    assert [p for p, _, _ in res["differ"]] == [("kernel_model", "fidelity")]
    assert res["only_old"] == [("environment", "threads")] and res["only_new"] == [("added",)]
    assert cr.compare(old, new, rtol=1e-3)["differ"] == []
