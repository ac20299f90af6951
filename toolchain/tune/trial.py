"""One trial and the worker loop: train the sampled settings, run the real build, judge the budget.

A trial trains a built-in architecture (``toolchain.steps.train.train_model``) and builds it for the
target with ``toolchain.build.build_bundles``, exactly as ``edgefleet train`` + ``edgefleet build``
would: conversion, verification in the device runtimes, accuracy on the selection part of
``--eval-data``, size, arena and latency, and the gates. The target's budget is tightened by the
command line limits before the build, so the build itself refuses a candidate over any of them.

Each trial's files stay in ``DIR/trials/NNNN/`` (model, build report, bundle when within budget).
Its verdict and figures go to the trial's Optuna user attributes, so nothing about a failed or
over-budget trial is lost: ``status`` is ``within_budget``, ``over_budget`` (built and measured, but
over a budget or gate; ``reason`` says which), ``failed`` (no measurement; ``reason``) or
``interrupted``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from toolchain.errors import USER_ERRORS
from toolchain.steps.data import Dataset
from toolchain.targets import Budget, Target, load_target
from toolchain.tune.space import TrialSettings, suggest
from toolchain.tune.study import SPEC_KEY, TuneSpec, counted, open_storage

log = logging.getLogger(__name__)

TRIALS_DIR = "trials"


class TrialFailed(Exception):
    """The trial produced no measurement; Optuna records it as FAIL (the reason is a user attribute)."""


@dataclass(frozen=True)
class WorkerJob:
    """What one worker process needs (picklable: it crosses a process boundary)."""

    data_path: str
    eval_path: str
    label: str | None
    storage_url: str
    study_name: str
    out_dir: str
    n_trials: int
    total: int
    worker: int
    sign_key: str | None = None


@dataclass
class TuneData:
    """The training data and the two parts of ``--eval-data``: selection (picks) and held-out (reports)."""

    train: Dataset
    selection: Dataset
    holdout: Dataset
    selection_idx: list[int]
    holdout_idx: list[int]


def split_eval(evald: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset, list[int], list[int]]:
    """Split ``evald`` (stratified, seeded) into (selection, held-out) parts and their indices."""
    import numpy as np

    ids = Dataset(
        np.arange(evald.n, dtype=np.float32).reshape(-1, 1), evald.y, None, evald.class_names, evald.source
    )
    rest, held = ids.split(1 - fraction, seed=seed)
    sel_idx = sorted(int(i) for i in rest.x[:, 0])
    hold_idx = sorted(int(i) for i in held.x[:, 0])
    sel = evald.subset(np.array(sel_idx, dtype=np.int64), f"{evald.source} (selection part)")
    hold = evald.subset(np.array(hold_idx, dtype=np.int64), f"{evald.source} (held-out part)")
    return sel, hold, sel_idx, hold_idx


def load_tune_data(data_path: str, eval_path: str, label: str | None, fraction: float, seed: int) -> TuneData:
    """Load ``--data`` and ``--eval-data`` and split the latter into selection and held-out parts."""
    from toolchain.steps.data import load_dataset

    train = load_dataset(data_path, label)
    evald = load_dataset(eval_path, label)
    sel, hold, sel_idx, hold_idx = split_eval(evald, fraction, seed)
    return TuneData(train, sel, hold, sel_idx, hold_idx)


def budgeted_target(name: str, budget: dict[str, Any]) -> Target:
    """Return target ``name`` with its ``[budget]`` replaced by ``budget`` (already the tighter of both)."""
    return dataclasses.replace(load_target(name), budget=Budget(**budget) if budget else None)


def run_trial(
    settings: TrialSettings, spec: TuneSpec, data: TuneData, trial_dir: Path, sign_key: str | None
) -> dict[str, Any]:
    """Train and build one candidate; return its user attributes (status, reason, figures, paths)."""
    from toolchain.build import BuildError, build_bundles
    from toolchain.steps.train import train_model

    attrs: dict[str, Any] = {"status": "failed", "reason": None}
    t0 = time.perf_counter()
    model_path = trial_dir / "model.keras"
    try:
        trained = train_model(
            data.train,
            settings.arch,
            settings.epochs,
            model_path,
            learning_rate=settings.learning_rate,
            seed=spec.seed,
            progress=False,
            arch_options=settings.arch_options,
        )
    except USER_ERRORS as e:
        attrs["reason"] = f"training failed: {e}"
        return attrs
    attrs["train_s"] = round(time.perf_counter() - t0, 2)
    attrs["val_accuracy"] = trained.val_accuracy if trained.val_accuracy == trained.val_accuracy else None
    t1 = time.perf_counter()
    build_dir = trial_dir / "build"
    try:
        report = build_bundles(
            model_path,
            data.train,
            [budgeted_target(spec.target, spec.budget)],
            build_dir,
            quantize=settings.quantize,
            prune=settings.sparsity or None,
            eval_data=data.selection,
            name=spec.name,
            sign_key=sign_key,
            progress=False,
        )
    except BuildError as e:
        report = e.report or {}
    except USER_ERRORS as e:
        attrs["reason"] = f"build failed: {e}"
        return attrs
    attrs["build_s"] = round(time.perf_counter() - t1, 2)
    attrs["report"] = str((build_dir / "report.json").relative_to(trial_dir.parent.parent))
    entry = (report.get("targets") or {}).get(spec.target) or {}
    figures = {
        "accuracy": entry.get("accuracy"),
        "float_accuracy": entry.get("float_accuracy"),
        "size_bytes": entry.get("size_bytes"),
        "gzip_size_bytes": entry.get("gzip_size_bytes"),
        "arena_bytes": entry.get("arena_bytes"),
        "latency_ms": entry.get("latency_ms_p95"),
        "latency_ms_p50": entry.get("latency_ms_p50"),
        "runtime": entry.get("preferred_runtime"),
    }
    attrs.update(figures)
    measured = all(figures[k] is not None for k in ("accuracy", "size_bytes", "latency_ms"))
    if entry.get("status") == "ok":
        attrs["status"] = "within_budget"
        attrs["bundle"] = str((build_dir / spec.target).relative_to(trial_dir.parent.parent))
    elif measured:
        attrs["status"] = "over_budget"
        attrs["reason"] = entry.get("error") or "the build failed without a reason"
    else:
        attrs["reason"] = entry.get("error") or "the build measured nothing"
    attrs["constraint"] = violation(attrs["status"], entry.get("budget"))
    return attrs


def violation(status: str, verdict: dict[str, Any] | None) -> float:
    """Return how far a candidate is outside its budget (0 within; > 0 over), for Optuna's constraints."""
    if status == "within_budget":
        return 0.0
    over = 0.0
    for key, v in (verdict or {}).items():
        if not v.get("ok") and v.get("measured") is not None and v.get("budget"):
            m, b = float(v["measured"]), float(v["budget"])
            over += (b / m - 1) if key.startswith("min_") and m > 0 else max(0.0, m / b - 1)
    # over a gate without a ratio (the accuracy drop, a failed check): count it as fully over
    return over if over > 0 else 1.0


def _release_keras() -> None:
    """Drop the Keras graph state of the trial that ended, so a worker's memory does not grow per trial."""
    if "tf_keras" in sys.modules:
        sys.modules["tf_keras"].backend.clear_session()


def make_objective(spec: TuneSpec, data: TuneData, out_dir: Path, worker: int, sign_key: str | None) -> Any:
    """Return the Optuna objective: accuracy (selection part), size_bytes, latency_ms (p95)."""

    def objective(trial: Any) -> tuple[float, float, float]:
        settings = suggest(trial, spec.archs, spec.max_epochs, spec.images)
        trial.set_user_attr("settings", settings.to_dict())
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("worker", worker)
        trial_dir = out_dir / TRIALS_DIR / f"{trial.number:04d}"
        trial_dir.mkdir(parents=True, exist_ok=True)
        try:
            attrs = run_trial(settings, spec, data, trial_dir, sign_key)
        except KeyboardInterrupt:
            trial.set_user_attr("status", "interrupted")
            trial.set_user_attr("reason", "interrupted (Ctrl-C or stopped); --resume runs another trial")
            raise
        except Exception as e:  # noqa: BLE001 - one broken candidate must not end the search
            log.warning("trial %d failed: %s", trial.number, e, exc_info=log.isEnabledFor(logging.DEBUG))
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            attrs = {"status": "failed", "reason": f"{type(e).__name__}: {first}", "constraint": 1.0}
        finally:
            _release_keras()
        for k, v in attrs.items():
            trial.set_user_attr(k, v)
        if attrs["status"] == "failed":
            raise TrialFailed(attrs["reason"])
        # the sampler prefers settings like the feasible trials (<= 0 is within budget)
        trial.set_constraint("budget", float(attrs["constraint"]))
        return (float(attrs["accuracy"]), float(attrs["size_bytes"]), float(attrs["latency_ms"]))

    return objective


def run_worker(job: WorkerJob, on_trial: Callable[[Any, Any], None] | None = None) -> int:
    """Run ``job.n_trials`` trials of the shared study (stop early once ``job.total`` are counted).

    Returns the number of trials this worker ran. This is the body of every worker process (and of
    the command itself with one worker): ``load_study`` on the shared storage, then ``optimize``.
    """
    import optuna

    storage = open_storage(job.storage_url)
    stored = optuna.load_study(study_name=job.study_name, storage=storage)
    spec = TuneSpec(**stored.user_attrs[SPEC_KEY])
    # Each worker (and each resume) samples from its own seed, so workers do not propose the same trials.
    sampler = optuna.samplers.TPESampler(seed=spec.seed * 1000 + job.worker + len(stored.trials))
    study = optuna.load_study(study_name=job.study_name, storage=storage, sampler=sampler)
    data = load_tune_data(job.data_path, job.eval_path, job.label, spec.selection_fraction, spec.seed)
    done_here = 0

    def after(study: Any, trial: Any) -> None:
        nonlocal done_here
        done_here += 1
        if on_trial is not None:
            on_trial(study, trial)
        if counted(study) >= job.total:
            study.stop()

    study.optimize(
        make_objective(spec, data, Path(job.out_dir), job.worker, job.sign_key),
        n_trials=job.n_trials,
        catch=(TrialFailed,),
        callbacks=[after],
        gc_after_trial=True,
    )
    return done_here


def worker_main(job_path: str) -> int:
    """Entry point of a worker process (``python -c`` from ``toolchain.tune.run``): run the job file's trials.

    Returns the exit code: 0, or 1 after logging one line when the worker could not run.
    """
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s worker: %(message)s")
    job = WorkerJob(**json.loads(Path(job_path).read_text()))
    try:
        run_worker(job)
    except KeyboardInterrupt:
        return 130
    except USER_ERRORS as e:
        print(f"Error: worker {job.worker}: {e}", file=sys.stderr)
        return 1
    return 0
