"""What a study found: candidates, the Pareto front, the best bundle and its held-out accuracy.

``collect`` reads every trial from the study (not from files, so trials run on other machines are
included) and ``write_results`` writes ``DIR/pareto.json``, copies the best candidate within budget to
``DIR/best/<target>/`` and measures it on the held-out part of ``--eval-data``, which no trial saw:
the candidates are ranked by their accuracy on the selection part, and the number reported for the
winner is the held-out one (the selection accuracy is biased upwards by the choice itself).
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path
from typing import Any

from toolchain.tune.study import COUNTED, TuneSpec

PARETO_SCHEMA = 1
BEST_DIR = "best"
FIGURES = (
    "accuracy",
    "float_accuracy",
    "size_bytes",
    "gzip_size_bytes",
    "arena_bytes",
    "latency_ms",
    "latency_ms_p50",
    "runtime",
)


def collect(study: Any) -> list[dict[str, Any]]:
    """Return one record per trial (running ones included, with status ``running``), by trial number."""
    out = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        a = t.user_attrs
        status = a.get("status") or ("running" if t.state.name == "RUNNING" else t.state.name.lower())
        rec: dict[str, Any] = {
            "trial": t.number,
            "status": status,
            "within_budget": status == "within_budget",
            "reason": a.get("reason"),
            "settings": a.get("settings") or dict(t.params),
        }
        rec.update({k: a.get(k) for k in FIGURES})
        for k in ("val_accuracy", "train_s", "build_s", "report", "bundle", "host", "worker"):
            rec[k] = a.get(k)
        out.append(rec)
    return out


def pareto_front(cands: list[dict[str, Any]]) -> list[int]:
    """Return the trial numbers within budget that no other one beats on accuracy, size and latency."""
    ok = [c for c in cands if c["within_budget"]]

    def dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
        ge = a["accuracy"] >= b["accuracy"] and a["size_bytes"] <= b["size_bytes"]
        ge = ge and a["latency_ms"] <= b["latency_ms"]
        gt = a["accuracy"] > b["accuracy"] or a["size_bytes"] < b["size_bytes"]
        return ge and (gt or a["latency_ms"] < b["latency_ms"])

    return [c["trial"] for c in ok if not any(dominates(o, c) for o in ok if o is not c)]


def pick_best(cands: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Return the candidate within budget with the best selection accuracy (then smaller, then faster)."""
    ok = [c for c in cands if c["within_budget"]]
    if not ok:
        return None
    return min(ok, key=lambda c: (-c["accuracy"], c["size_bytes"], c["latency_ms"], c["trial"]))


def _copy_best(out_dir: Path, best: dict[str, Any], target: str) -> Path | None:
    """Copy the best trial's bundle (and its build report) to ``DIR/best/``; None if not on this machine."""
    src = out_dir / str(best["bundle"])
    if not best.get("bundle") or not (src / "manifest.json").is_file():
        return None
    dest_root = out_dir / BEST_DIR
    staging = out_dir / f".{BEST_DIR}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(src, staging / target)
    for name in ("report.json", "report.html"):
        if (src.parent / name).is_file():
            shutil.copy2(src.parent / name, staging / name)
    shutil.rmtree(dest_root, ignore_errors=True)
    staging.rename(dest_root)
    return dest_root / target


def holdout_accuracy(bundle_dir: Path, runtime: str, holdout: Any) -> float | None:
    """Return the bundle's accuracy on the held-out samples in ``runtime``, as the device runs it."""
    from toolchain.steps.device_eval import evaluate_on_agent

    figures, _ = evaluate_on_agent(bundle_dir, runtime, holdout.x, holdout.y)
    acc = figures.get("accuracy")
    return float(acc) if acc is not None else None


def summarise(
    spec: TuneSpec, cands: list[dict[str, Any]], requested: int, selection: Any, holdout: Any
) -> dict[str, Any]:
    """Return pareto.json's document without the best candidate's held-out figures."""
    counts = {s: sum(1 for c in cands if c["status"] == s) for s in (*COUNTED, "interrupted", "running")}
    return {
        "schema": PARETO_SCHEMA,
        "target": spec.target,
        "budget": spec.budget,
        "objectives": {"accuracy": "maximize", "size_bytes": "minimize", "latency_ms": "minimize"},
        "latency": "latency_ms is the p95 of one batch-1 call at the target's threads (what the budget"
        " checks); latency_ms_p50 the median",
        "selection": {
            "samples": selection.n,
            "fraction": spec.selection_fraction,
            "seed": spec.seed,
            "note": "candidates are ranked by accuracy on this part of --eval-data",
        },
        "holdout": {
            "samples": holdout.n,
            "note": "the best candidate's final accuracy is measured on this part, which no trial saw",
        },
        "trials": {"requested": requested, "total": len(cands), **counts},
        "candidates": cands,
        "pareto_front": pareto_front(cands),
        "best": None,
    }


def write_results(out_dir: Path, spec: TuneSpec, doc: dict[str, Any], holdout: Any) -> dict[str, Any]:
    """Copy the best bundle, measure it on the held-out part, write ``DIR/pareto.json``; return the doc."""
    best = pick_best(doc["candidates"])
    if best is not None:
        entry: dict[str, Any] = {
            "trial": best["trial"],
            "settings": best["settings"],
            "selection_accuracy": best["accuracy"],
            "holdout_accuracy": None,
            "size_bytes": best["size_bytes"],
            "arena_bytes": best["arena_bytes"],
            "latency_ms": best["latency_ms"],
            "runtime": best["runtime"],
            "bundle": None,
        }
        where = _copy_best(out_dir, best, spec.target)
        if where is None:
            entry["note"] = (
                f"the bundle of trial {best['trial']} is on host {best.get('host')!r}"
                f" ({best.get('bundle')}), not on {socket.gethostname()!r}"
            )
        else:
            entry["bundle"] = str(where.relative_to(out_dir))
            entry["holdout_accuracy"] = holdout_accuracy(where, str(best["runtime"]), holdout)
        doc["best"] = entry
    tmp = out_dir / ".pareto.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2, allow_nan=False))
    tmp.replace(out_dir / "pareto.json")
    return doc
