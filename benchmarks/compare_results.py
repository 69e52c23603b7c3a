"""Two results.json files field by field: behaviour unchanged across a refactor.

Usage:  python3 benchmarks/compare_results.py OLD/results.json NEW/results.json [--json out.json]

Every leaf of both files is compared by its path (lists by index). Keys renamed on purpose map old →
new (:data:`RENAMED`); the fields that measure the machine rather than the method (wall times, memory,
the dntk version) are counted apart and not required equal. Numbers must be equal exactly;
``--rtol`` allows a relative tolerance. Prints a summary and every differing leaf; exit 1 when a
compared field differs or is missing on one side."""

from __future__ import annotations

import argparse
import json
import math
import re
import sys

# key renames of #23 (names that say their stage): sentence keys → short constant keys
RENAMED = {"per-logit kernel, all m points": "all_points", "own-class blocks": "own_class"}
# fields that measure the run's machine or name the code, not the method's numbers: wall times, memory,
# and the dntk version (its commit); the rest of "environment" (threads, torch, the data fingerprint) is compared
MACHINE = ("timings_s", "peak_memory_mb", "stage_memory_mb")


def leaves(obj, path=(), out_dir=None):
    """{path tuple: leaf value} of a JSON value, keys renamed by :data:`RENAMED`; the run's own --out
    folder (``config.out``) in a string is written ``<out>``, so two runs in two folders compare."""
    if out_dir is None and isinstance(obj, dict):
        out_dir = str((obj.get("config") or {}).get("out") or "") or None
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            out.update(leaves(v, path + (RENAMED.get(k, k),), out_dir))
        return out
    if isinstance(obj, list):
        out = {}
        for i, v in enumerate(obj):
            out.update(leaves(v, path + (i,), out_dir))
        return out if obj else {path: []}
    if isinstance(obj, str) and out_dir:   # the folder as a whole path component only ("/b" is not in "/best.pt")
        obj = re.sub(re.escape(out_dir.rstrip("/")) + r"(?=/|$|[\s'\"),;])", "<out>", obj)
    return {path: obj}


def machine(path) -> bool:
    """Whether a field measures the machine: under a MACHINE key, or a timing leaf."""
    return path[0] in MACHINE or path[:2] == ("environment", "dntk") or any(isinstance(p, str) and (p.endswith("_s") or "seconds" in p or p == "time")
                                     for p in path)


def same(a, b, rtol: float) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) or not isinstance(b, (int, float)):
        return a == b
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b or abs(a - b) <= rtol * max(abs(a), abs(b))


def compare(old: dict, new: dict, rtol: float = 0.0) -> dict:
    """{"compared", "equal", "differ": [(path, old, new)], "only_old", "only_new", "machine"}."""
    lo, ln = leaves(old), leaves(new)
    keys = sorted(set(lo) | set(ln), key=lambda p: tuple(map(str, p)))
    res = {"compared": 0, "equal": 0, "differ": [], "only_old": [], "only_new": [], "machine": 0}
    for p in keys:
        if machine(p):
            res["machine"] += 1
            continue
        if p not in ln:
            res["only_old"].append(p)
            continue
        if p not in lo:
            res["only_new"].append(p)
            continue
        res["compared"] += 1
        if same(lo[p], ln[p], rtol):
            res["equal"] += 1
        else:
            res["differ"].append((p, lo[p], ln[p]))
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--rtol", type=float, default=0.0, help="relative tolerance for numbers (default: exact)")
    ap.add_argument("--json", help="also write the summary here")
    a = ap.parse_args()
    with open(a.old) as f, open(a.new) as g:
        res = compare(json.load(f), json.load(g), a.rtol)
    show = lambda p: ".".join(map(str, p))  # noqa: E731
    print(f"{a.old} vs {a.new}: {res['compared']} fields compared, {res['equal']} equal, {len(res['differ'])} differ; "
          f"{len(res['only_old'])} only in old, {len(res['only_new'])} only in new; {res['machine']} machine fields "
          "(times, memory, dntk version) not compared")
    for p, x, y in res["differ"]:
        print(f"  differs  {show(p)}: {x!r} → {y!r}")
    for p in res["only_old"]:
        print(f"  only old {show(p)}")
    for p in res["only_new"]:
        print(f"  only new {show(p)}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({**res, "differ": [[show(p), x, y] for p, x, y in res["differ"]],
                       "only_old": list(map(show, res["only_old"])), "only_new": list(map(show, res["only_new"]))},
                      f, indent=1)
    sys.exit(1 if res["differ"] or res["only_old"] or res["only_new"] else 0)


if __name__ == "__main__":
    main()
