"""The study's storage and identity: open the Optuna RDB storage, create or resume, count trials.

A study is started with a ``TuneSpec`` (data, target, budget, search choices, seed), stored in the
study's user attributes; ``--resume`` and workers joining from other machines must bring the same
spec (same data by SHA-256, same target and budget), or they stop with one line saying what differs.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from toolchain.errors import ToolchainError

log = logging.getLogger(__name__)

STUDY_FILE = "study.sqlite3"
# Optuna's heartbeat: a RUNNING trial whose worker sent nothing for GRACE_S seconds (killed, machine
# gone) is marked FAIL by the next worker, so its slot is tried again.
HEARTBEAT_S = 10
GRACE_S = 60
SQLITE_TIMEOUT_S = 60  # several local workers write the one SQLite file; wait for the lock
# Trial states (user attribute "status") that count towards --trials; "interrupted" does not.
COUNTED = ("within_budget", "over_budget", "failed")
SPEC_KEY = "edgefleet_tune_spec"


class TuneError(ToolchainError):
    """A tuning run cannot start or ended without a candidate within budget."""


@dataclass(frozen=True)
class TuneSpec:
    """What a study searches: every worker and every resume must agree on it."""

    target: str
    budget: dict[str, Any]
    archs: list[str]
    max_epochs: int
    seed: int
    selection_fraction: float
    data_sha256: str
    eval_sha256: str
    images: bool
    name: str
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def differences(self, other: Mapping[str, Any]) -> list[str]:
        """Return the keys whose value differs from a stored spec (``to_dict`` form)."""
        mine = self.to_dict()
        return [k for k in mine if k != "extra" and other.get(k) != mine[k]]


def storage_url(storage: str | None, out_dir: Path) -> str:
    """Return the SQLAlchemy URL to use: ``--storage`` (checked) or ``sqlite:///DIR/study.sqlite3``.

    ``postgresql://`` is taken to mean the psycopg 3 driver the project uses (``postgresql+psycopg://``).
    """
    if storage is None:
        return f"sqlite:///{(out_dir / STUDY_FILE).resolve()}"
    url = storage.strip()
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("sqlite:///") and len(url) > len("sqlite:///"):
        return url
    if url.startswith("postgresql+psycopg://") and len(url) > len("postgresql+psycopg://"):
        return url
    raise TuneError(
        f"--storage {storage!r} is not a study database URL; use sqlite:///PATH or"
        " postgresql+psycopg://USER@HOST:PORT/DB"
    )


def shown_url(url: str) -> str:
    """Return ``url`` without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot parse is shown as given
        return url


def open_storage(url: str) -> Any:
    """Return an ``optuna.storages.RDBStorage`` for ``url`` with heartbeats; one-line error if it fails."""
    import optuna

    # Optuna logs every failed trial with its traceback; the trial's reason is in pareto.json and the
    # table instead (EDGEFLEET_DEBUG=1 / --debug shows Optuna's lines).
    debug = os.environ.get("EDGEFLEET_DEBUG") == "1"
    optuna.logging.set_verbosity(optuna.logging.INFO if debug else optuna.logging.ERROR)
    engine_kwargs: dict[str, Any] = {}
    if url.startswith("sqlite:"):
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        engine_kwargs["connect_args"] = {"timeout": SQLITE_TIMEOUT_S}
    else:
        engine_kwargs["pool_pre_ping"] = True
    try:
        with warnings.catch_warnings():
            # heartbeats are "experimental" in Optuna 5; the interface is pinned by pyproject (<6)
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S
            )
    except Exception as e:  # noqa: BLE001 - SQLAlchemy/driver errors of many kinds
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise TuneError(f"cannot open the study database {shown_url(url)}: {first}") from None


def directions() -> list[Literal["minimize", "maximize"]]:
    """Return the study's objectives: selection accuracy up, model size and p95 latency down."""
    return ["maximize", "minimize", "minimize"]


def open_study(storage: Any, study_name: str, spec: TuneSpec, resume: bool) -> Any:
    """Create the study, or load it with ``resume``; refuse a mismatched or unexpected existing one."""
    import optuna

    names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    if study_name in names:
        study = optuna.load_study(study_name=study_name, storage=storage)
        stored = study.user_attrs.get(SPEC_KEY)
        if not resume:
            raise TuneError(
                f"study {study_name!r} already exists with {len(study.trials)} trials; pass --resume to"
                " continue it, or use another --out (or --study)"
            )
        if not isinstance(stored, dict):
            raise TuneError(f"study {study_name!r} was not started by 'edgefleet tune'; use another --study")
        diff = spec.differences(stored)
        if diff:
            shown = ", ".join(f"{k} (stored {stored.get(k)!r}, now {spec.to_dict()[k]!r})" for k in diff)
            raise TuneError(
                f"--resume: study {study_name!r} was started with other settings: {shown}; resume with"
                " the same data and options, or start a new study"
            )
        return study
    study = optuna.create_study(study_name=study_name, storage=storage, directions=directions())
    study.set_user_attr(SPEC_KEY, spec.to_dict())
    return study


def counted(study: Any) -> int:
    """Return how many trials count towards --trials (finished with a verdict)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if t.user_attrs.get("status") in COUNTED)


def running(study: Any) -> int:
    """Return how many trials are running now (here or on other machines)."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
