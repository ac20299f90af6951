"""``tune``: the Python API behind ``edgefleet tune`` (checks, worker processes, progress, outputs).

Cheap checks come first (target, limits, storage URL, signing key), then the data is loaded and
split, the study created or resumed, and the remaining trials shared among ``workers`` processes on
this machine, each doing Optuna's multi-process pattern (``load_study`` + ``optimize``) against the
one RDB storage. With one worker the trials run in this process. A bar advances per finished trial.
Whatever happens, ``DIR/pareto.json`` and ``DIR/report.html`` are written from the study at the end
(an interrupted run included), so nothing measured is lost.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from toolchain.targets import BUDGET_KEYS, load_target
from toolchain.tune.space import applicable_archs
from toolchain.tune.study import (
    TuneError,
    TuneSpec,
    counted,
    open_storage,
    open_study,
    running,
    shown_url,
    storage_url,
)
from toolchain.tune.trial import WorkerJob, load_tune_data, run_worker

log = logging.getLogger(__name__)

DEFAULT_MAX_EPOCHS = 30
SELECTION_FRACTION = 0.5  # of --eval-data ranks candidates; the rest is held out for the winner
POLL_S = 2.0  # how often the command reads the study for the progress bar while workers run
WORKER_STOP_S = 30.0  # after Ctrl-C, how long workers get to record their trial as interrupted


def effective_budget(target_budget: dict[str, Any] | None, limits: dict[str, Any]) -> dict[str, Any]:
    """Return the tighter of the target's ``[budget]`` and the command line limits, per key."""
    out: dict[str, Any] = {}
    for key in BUDGET_KEYS:
        vals = [v for v in ((target_budget or {}).get(key), limits.get(key)) if v is not None]
        if vals:
            out[key] = max(vals) if key.startswith("min_") else min(vals)
    return out


def shares(remaining: int, workers: int) -> list[int]:
    """Split ``remaining`` trials among at most ``workers`` workers (every share at least 1)."""
    w = max(1, min(workers, remaining))
    return [remaining // w + (1 if i < remaining % w else 0) for i in range(w)]


def _bar(total: int, initial: int, progress: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc="trials",
        unit="trial",
        disable=not (progress and sys.stderr.isatty()),
        file=sys.stderr,
    )


def tune(
    data: str | Path,
    eval_data: str | Path,
    target: str,
    out_dir: str | Path,
    *,
    trials: int,
    workers: int = 1,
    max_model_bytes: int | None = None,
    max_arena_bytes: int | None = None,
    max_latency_ms: float | None = None,
    resume: bool = False,
    storage: str | None = None,
    study_name: str | None = None,
    seed: int = 0,
    archs: Sequence[str] | None = None,
    max_epochs: int = DEFAULT_MAX_EPOCHS,
    label: str | None = None,
    sign_key: str | Path | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Search for the most accurate model within the budget; return pareto.json's document.

    Raises TuneError (one line) for bad input, and when no trial met every budget (after writing
    pareto.json and report.html).
    """
    from toolchain.steps.train import data_sha256

    t0 = time.perf_counter()
    if trials < 1 or workers < 1 or max_epochs < 1:
        raise TuneError("--trials, --workers and --epochs must be at least 1")
    limits: dict[str, float | None] = {
        "max_model_bytes": max_model_bytes,
        "max_arena_bytes": max_arena_bytes,
        "max_latency_ms": max_latency_ms,
    }
    for key, v in limits.items():
        if v is not None and not v > 0:
            raise TuneError(f"--{key.replace('_', '-')} {v} must be positive")
    tgt = load_target(target)
    budget = effective_budget(tgt.budget.to_dict() if tgt.budget else None, limits)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise TuneError(f"--out {str(out)!r} is a file; give a folder")
    url = storage_url(storage, out)
    if sign_key is not None:
        from toolchain.build import _check_sign_key

        _check_sign_key(Path(sign_key))
    out.mkdir(parents=True, exist_ok=True)
    store = open_storage(url)
    tdata = load_tune_data(str(data), str(eval_data), label, SELECTION_FRACTION, seed)
    if tdata.train.class_names != tdata.selection.class_names:
        raise TuneError(
            f"--eval-data classes {tdata.selection.class_names} differ from --data classes"
            f" {tdata.train.class_names}; use data with the same classes"
        )
    images = len(tdata.train.sample_shape) == 3
    fits = applicable_archs(tdata.train.sample_shape)
    chosen = list(archs) if archs else list(fits)
    bad = [a for a in chosen if a not in fits]
    if bad:
        raise TuneError(
            f"--arch {bad[0]} does not take samples of shape {tuple(tdata.train.sample_shape)}; use {', '.join(fits)}"
        )
    spec = TuneSpec(
        target=tgt.name,
        budget=budget,
        archs=chosen,
        max_epochs=max_epochs,
        seed=seed,
        selection_fraction=SELECTION_FRACTION,
        data_sha256=data_sha256(tdata.train),
        eval_sha256=data_sha256(tdata.selection) + data_sha256(tdata.holdout),
        images=images,
        name=out.resolve().name or "tuned",
    )
    name = study_name or f"tune-{tgt.name}"
    study = open_study(store, name, spec, resume)
    done = counted(study)
    remaining = trials - done - running(study)
    warnings: list[str] = []
    interrupted = False
    if remaining > 0:
        jobs = [
            WorkerJob(
                data_path=str(data),
                eval_path=str(eval_data),
                label=label,
                storage_url=url,
                study_name=name,
                out_dir=str(out.resolve()),
                n_trials=n,
                total=trials,
                worker=i,
                sign_key=str(sign_key) if sign_key else None,
            )
            for i, n in enumerate(shares(remaining, workers))
        ]
        bar = _bar(trials, done, progress)
        try:
            if len(jobs) == 1:
                run_worker(jobs[0], on_trial=lambda s, t: bar.update(max(0, counted(s) - bar.n)))
            else:
                warnings += _run_processes(jobs, study, bar)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            bar.close()
    doc = _finish(out, spec, study, trials, tdata, warnings, url, name)
    doc["search_s"] = round(time.perf_counter() - t0, 2)
    tmp = out / ".pareto.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2, allow_nan=False))
    tmp.replace(out / "pareto.json")
    if interrupted:
        raise KeyboardInterrupt
    if doc["best"] is None:
        raise TuneError(_no_candidate(doc))
    return doc


def _run_processes(jobs: list[WorkerJob], study: Any, bar: Any) -> list[str]:
    """Run one worker process per job (the study's storage is their only link); return warnings."""
    warnings: list[str] = []
    procs: list[tuple[WorkerJob, subprocess.Popen[bytes]]] = []
    with tempfile.TemporaryDirectory(prefix="edgefleet-tune-") as tmp:
        for job in jobs:
            path = Path(tmp) / f"worker-{job.worker}.json"
            path.write_text(json.dumps(job.__dict__))
            code = (
                "import sys; from toolchain.tune.trial import worker_main; sys.exit(worker_main(sys.argv[1]))"
            )
            # stdout to stderr: the command's stdout is for --json only
            procs.append((job, subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=sys.stderr)))
        try:
            while any(p.poll() is None for _, p in procs):
                time.sleep(POLL_S)
                bar.update(max(0, counted(study) - bar.n))
        except KeyboardInterrupt:
            # the workers got the same Ctrl-C from the terminal; give them time to record their trial
            for _, p in procs:
                try:
                    p.wait(timeout=WORKER_STOP_S)
                except subprocess.TimeoutExpired:
                    p.terminate()
                    p.wait()
            raise
        bar.update(max(0, counted(study) - bar.n))
    for job, p in procs:
        if p.returncode != 0:
            warnings.append(f"worker {job.worker} exited with code {p.returncode}; see its lines above")
    return warnings


def _finish(
    out: Path,
    spec: TuneSpec,
    study: Any,
    trials: int,
    tdata: Any,
    warnings: list[str],
    url: str,
    name: str,
) -> dict[str, Any]:
    from toolchain.tune.html import write_html
    from toolchain.tune.results import collect, summarise, write_results

    doc = summarise(spec, collect(study), trials, tdata.selection, tdata.holdout)
    doc["study"] = {"name": name, "storage": shown_url(url)}
    doc["warnings"] = warnings
    doc = write_results(out, spec, doc, tdata.holdout)
    write_html(out, doc)
    return doc


def _no_candidate(doc: dict[str, Any]) -> str:
    """Return the one-line error when no trial met every budget: how many, and the closest one's reason."""
    cands = [c for c in doc["candidates"] if c["status"] in ("over_budget", "failed")]
    n = len(cands)
    budget = ", ".join(f"{k} {v}" for k, v in doc["budget"].items()) or "the target's limits"
    closest = next((c for c in cands if c["status"] == "over_budget"), cands[0] if cands else None)
    why = f"; e.g. trial {closest['trial']}: {closest['reason']}" if closest else ""
    return (
        f"none of the {n} trials met every budget ({budget}){why}; relax the limits, or widen the search"
        " (--arch, --epochs, more --trials). Every trial is in pareto.json"
    )
