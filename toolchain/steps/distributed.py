"""``edgefleet train --workers N``: data-parallel training on ``tf.distribute.MultiWorkerMirroredStrategy``.

The command starts N worker processes on this machine, each with a ``TF_CONFIG`` naming all N on
127.0.0.1 ports and its own index. Every worker creates the strategy first (before any other
TensorFlow work), loads the same data and runs ``train_model`` with the strategy: the model's
variables are mirrored, each step splits the global batch (``BATCH_SIZE``, as with one worker) among
the workers and all-reduces the gradients, so N workers follow one worker's optimisation closely.
Worker 0 (the chief) saves the model and its metadata at ``--out`` and writes its result for the
command; the others save to a scratch folder (Keras wants every worker to save). If one worker
fails, the others are stopped (a collective would wait for it forever) and the command says which.

Across machines the same code runs: start one ``python -m toolchain.steps.distributed`` per machine
with ``TF_CONFIG`` naming every machine (docs/cli.md, "Training on several machines").
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from toolchain.steps.train import DEFAULT_SEED, TrainError, TrainResult

POLL_S = 0.5
STOP_S = 10.0  # after a worker failed, how long the others get to exit before they are killed


@dataclass(frozen=True)
class DistributedJob:
    """What every worker trains (the same for all of them; the index comes from ``TF_CONFIG``)."""

    data_path: str
    label: str | None
    arch: str
    epochs: int
    out_path: str
    seed: int = DEFAULT_SEED
    class_weight: str = "auto"
    scratch: str = ""
    progress: bool = True


def free_ports(n: int) -> list[int]:
    """Return ``n`` distinct free TCP ports on 127.0.0.1 (free when asked; a race is possible)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def tf_config(workers: list[str], index: int) -> str:
    """Return the ``TF_CONFIG`` JSON for worker ``index`` of the cluster ``workers`` (``host:port``)."""
    return json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})


def train_workers(
    data_path: str,
    label: str | None,
    arch: str,
    epochs: int,
    out_path: Path,
    *,
    workers: int,
    seed: int = DEFAULT_SEED,
    class_weight: str = "auto",
    progress: bool = True,
) -> TrainResult:
    """Train with ``workers`` local worker processes; return the chief's result (``model`` is None)."""
    if workers < 2:
        raise TrainError(f"--workers {workers}: distributed training needs at least 2 workers")
    hosts = [f"127.0.0.1:{p}" for p in free_ports(workers)]
    with tempfile.TemporaryDirectory(prefix="edgefleet-train-") as tmp:
        job = DistributedJob(
            data_path, label, arch, epochs, str(out_path), seed, class_weight, scratch=tmp, progress=progress
        )
        job_path = Path(tmp) / "job.json"
        job_path.write_text(json.dumps(asdict(job)))
        code = "import sys; from toolchain.steps.distributed import worker_main; sys.exit(worker_main(sys.argv[1]))"
        procs: list[subprocess.Popen[bytes]] = []
        logs = []
        for i in range(workers):
            env = {**os.environ, "TF_CONFIG": tf_config(hosts, i)}
            # the chief's stderr is the user's (its epoch bar); the others' go to a log shown on failure
            log = sys.stderr if i == 0 else open(Path(tmp) / f"worker-{i}.log", "wb")  # noqa: SIM115
            logs.append(log)
            procs.append(
                subprocess.Popen([sys.executable, "-c", code, str(job_path)], env=env, stdout=log, stderr=log)
            )
        try:
            failed = _wait(procs)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for log in logs[1:]:
                log.close()
        if failed is not None:
            i, rc = failed
            raise TrainError(
                f"training worker {i} of {workers} exited with code {rc}{_last_line(Path(tmp), i)};"
                " the other workers were stopped"
            )
        doc = json.loads((Path(tmp) / "result.json").read_text())
    doc["class_weight"] = {int(k): v for k, v in doc["class_weight"].items()} if doc["class_weight"] else None
    doc["path"] = Path(doc["path"])
    doc["meta_path"] = Path(doc["meta_path"]) if doc["meta_path"] else None
    return TrainResult(model=None, **doc)


def _wait(procs: list[subprocess.Popen[bytes]]) -> tuple[int, int] | None:
    """Wait for every worker; on the first failure stop the others and return (index, exit code)."""
    while True:
        codes = [p.poll() for p in procs]
        bad = next(((i, c) for i, c in enumerate(codes) if c not in (None, 0)), None)
        if bad is not None:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            deadline = time.monotonic() + STOP_S
            for p in procs:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
            return bad
        if all(c == 0 for c in codes):
            return None
        time.sleep(POLL_S)


def _last_line(tmp: Path, index: int) -> str:
    log = tmp / f"worker-{index}.log"
    if index == 0 or not log.is_file():
        return ""
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    return f" ({lines[-1][:200]})" if lines else ""


def worker_main(job_path: str) -> int:
    """Body of one worker process: create the strategy from ``TF_CONFIG``, train, the chief reports."""
    from toolchain.errors import USER_ERRORS
    from toolchain.tfenv import import_tf

    job = DistributedJob(**json.loads(Path(job_path).read_text()))
    tf = import_tf()
    strategy = tf.distribute.MultiWorkerMirroredStrategy()  # first: it joins the cluster
    index = int(json.loads(os.environ["TF_CONFIG"])["task"]["index"])
    from toolchain.steps.data import load_dataset
    from toolchain.steps.train import train_model

    out = (
        Path(job.out_path) if index == 0 else Path(job.scratch) / f"worker-{index}" / Path(job.out_path).name
    )
    try:
        result = train_model(
            load_dataset(job.data_path, job.label),
            job.arch,
            job.epochs,
            out,
            seed=job.seed,
            class_weight=job.class_weight,
            progress=job.progress and index == 0,
            strategy=strategy,
        )
    except USER_ERRORS as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1
    if index == 0:
        doc = {
            "path": str(result.path),
            "epochs_run": result.epochs_run,
            "val_accuracy": result.val_accuracy,
            "train_accuracy": result.train_accuracy,
            "history": result.history,
            "best_epoch": result.best_epoch,
            "val_loss": result.val_loss,
            "seed": result.seed,
            "class_weight": result.class_weight,
            "val_recall": result.val_recall,
            "meta_path": str(result.meta_path) if result.meta_path else None,
        }
        (Path(job.scratch) / "result.json").write_text(json.dumps(doc))
    return 0


if __name__ == "__main__":
    sys.exit(worker_main(sys.argv[1]))
