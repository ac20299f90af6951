"""The ``edgefleet-agent`` command line: ``predict`` (offline), ``bench`` (on-device profile), ``run``
(the daemon), ``check`` (config), ``status`` (ask the running daemon).

Only this layer prints. Exit codes: 0 ok, 1 bad input (predict) or agent unreachable (status), 2 bad
flags (click), 78 bad daemon config (EX_CONFIG) for ``run``, ``check`` and ``status``.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

from device_agent.errors import AgentError, ConfigError

EX_CONFIG = 78
MAX_ROWS_PRINTED = 50
# --config FILE: the agent.toml of run, check and status
config_option = click.option(
    "--config", "config_path", required=True, type=click.Path(path_type=Path), help="agent.toml"
)


def _setup_logging(debug: bool, level: str) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logs.")
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
)
@click.version_option(package_name="edgefleet")
@click.pass_context
def main(ctx: click.Context, debug: bool, log_level: str) -> None:
    """edgefleet-agent: run model bundles on a device, offline or as a daemon with telemetry."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug or os.environ.get("EDGEFLEET_DEBUG") == "1"
    _setup_logging(ctx.obj["debug"], log_level)


def _fail(ctx: click.Context, e: Exception, code: int) -> None:
    if ctx.obj and ctx.obj.get("debug"):
        raise e
    click.echo(f"Error: {e}", err=True)
    sys.exit(code)


# --------------------------------------------------------------------------------------------------
# predict


class InputFileError(AgentError):
    """An input file for ``predict`` cannot be read."""


def _bundle_run_options(f: Any) -> Any:
    """Add the options that say how to load a bundle: --trusted-key, --runtime, --threads."""
    f = click.option(
        "--threads", type=click.IntRange(1, 64), help="Inference threads (default: the bundle's)."
    )(f)
    f = click.option(
        "--runtime", type=click.Choice(["litert", "onnxruntime", "openvino"]), help="Override the runtime."
    )(f)
    return click.option(
        "--trusted-key",
        "trusted_keys",
        multiple=True,
        type=click.Path(path_type=Path),
        help="Ed25519 public key (.pub) the bundle must be signed with; without one, unsigned bundles run.",
    )(f)


def _trusted_keys(paths: tuple[Path, ...]) -> tuple[bytes, ...]:
    """Load the --trusted-key files; warn on stderr when there are none (hashes are still checked)."""
    from device_agent.formats.keys import load_trusted_keys

    keys = load_trusted_keys(paths)
    if not keys:
        click.echo(
            "warning: no --trusted-key given; the bundle's signature is not checked (hashes are)", err=True
        )
    return keys


def read_inputs(path: Path, label: str | None) -> tuple[Any, Any]:
    """Return (inputs float32 array, true labels or None) from .npy, .npz (``x``) or .csv."""
    import numpy as np

    suffix = path.suffix.lower()
    if not path.is_file():
        raise InputFileError(f"input file {str(path)!r} does not exist")
    y = None
    try:
        if suffix == ".npy":
            if label is not None:
                raise InputFileError(
                    "--label names a column of a CSV or an array of an .npz; an .npy holds inputs only"
                )
            x = np.load(path, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                if "x" not in z.files:
                    raise InputFileError(
                        f"{str(path)!r} has no array 'x' (it has {', '.join(z.files) or 'none'});"
                        " save inputs as x"
                    )
                x = z["x"]
                if label is not None:
                    if label not in z.files:
                        raise InputFileError(
                            f"--label {label!r} is not an array in {str(path)!r}; it has {', '.join(z.files)}"
                        )
                    y = z[label]
        elif suffix == ".csv":
            x, y = _read_csv(path, label)
        else:
            raise InputFileError(f"input {str(path)!r}: use a .npy, .npz (with 'x') or .csv file")
    except (ValueError, OSError) as e:
        raise InputFileError(f"cannot read {str(path)!r}: {e}") from None
    if x.dtype.kind not in "fiub":
        raise InputFileError(f"inputs in {str(path)!r} are {x.dtype}, not numbers")
    return x.astype(np.float32), y


def _read_csv(path: Path, label: str | None) -> tuple[Any, Any]:
    import numpy as np

    with open(path, newline="", encoding="utf-8") as fh:
        rows = [r for r in csv.reader(fh) if r]
    if not rows:
        raise InputFileError(f"{str(path)!r} is empty")

    def numeric(row: list[str]) -> bool:
        try:
            [float(v) for v in row]
            return True
        except ValueError:
            return False

    header = None if numeric(rows[0]) else rows[0]
    body = rows[1:] if header is not None else rows
    col = None
    if label is not None:
        if header is not None and label in header:
            col = header.index(label)
        elif label.isdigit():
            col = int(label)
        else:
            raise InputFileError(
                f"--label {label!r} is not a column of {str(path)!r} (header: {', '.join(header or [])})"
            )
    width = len(body[0]) if body else 0
    x_rows, y = [], []
    for i, r in enumerate(body):
        if len(r) != width:
            raise InputFileError(f"{str(path)!r} row {i + 1} has {len(r)} columns, the first has {width}")
        if col is not None:
            y.append(r[col])
            r = r[:col] + r[col + 1 :]
        try:
            x_rows.append([float(v) for v in r])
        except ValueError:
            raise InputFileError(
                f"{str(path)!r} row {i + 1} holds a non-number; pass --label for the label column"
            ) from None
    return np.asarray(x_rows, dtype=np.float32), (y if col is not None else None)


@main.command("predict")
@click.option("--bundle", "bundle", required=True, type=click.Path(path_type=Path), help="Bundle directory.")
@click.option(
    "--input",
    "input_path",
    required=True,
    type=click.Path(path_type=Path),
    help=".npy, .npz (array 'x') or .csv (one sample per row, flattened).",
)
@click.option("--label", help="CSV column (name or index) or .npz array with true labels: report accuracy.")
@click.option(
    "--output", "output", type=click.Path(path_type=Path), help="Write predictions to .csv, .json or .npy."
)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_bundle_run_options
@click.pass_context
def predict_cmd(
    ctx: click.Context,
    bundle: Path,
    input_path: Path,
    label: str | None,
    output: Path | None,
    as_json: bool,
    trusted_keys: tuple[Path, ...],
    runtime: str | None,
    threads: int | None,
) -> None:
    """Run a bundle on a file of inputs, with no network; print or write labels and scores."""
    import numpy as np

    try:
        from device_agent.agent import PREDICT_BATCH, Agent, prediction_ids
        from device_agent.bench import as_batch

        keys = _trusted_keys(trusted_keys)
        agent = Agent(bundle, trusted_keys=keys, allow_unsigned=not keys, runtime=runtime, threads=threads)
        x, y = read_inputs(input_path, label)
        x = as_batch(x, agent.model.predictor.sample_shape)
        if y is not None and len(y) != x.shape[0]:
            raise InputFileError(f"{len(y)} labels for {x.shape[0]} inputs")
        outs = []
        # the agent's own decision per sample: the top-1 class and its score, or for an anomaly
        # bundle normal/anomaly and the anomaly score
        pred_labels: list[str] = []
        top_scores: list[float] = []
        for i in range(0, x.shape[0], PREDICT_BATCH):
            got = agent.predict(x[i : i + PREDICT_BATCH])
            outs.append(got.outputs)
            pred_labels += got.labels
            top_scores += [float(v) for v in got.scores]
        scores = np.concatenate(outs) if outs else np.zeros((0, len(agent.labels)))
    except AgentError as e:
        _fail(ctx, e, 1)
        return
    if agent.model.manifest.task_type == "regression":
        _print_values(ctx, agent, scores, y, output, as_json)
        return
    labels = agent.labels
    accuracy = None
    if y is not None:
        # a true label is a label name, or a class index into the bundle's labels
        truth = [str(v) for v in y]
        truth = [
            labels[int(t)] if t not in labels and t.isdigit() and int(t) < len(labels) else t for t in truth
        ]
        accuracy = (
            float(np.mean([p == t for p, t in zip(pred_labels, truth, strict=False)])) if truth else None
        )
    m = agent.model
    doc: dict[str, Any] = {
        "model": {**m.ref.to_dict(), "runtime": m.runtime},
        "task": m.manifest.task_type,
        "count": int(scores.shape[0]),
        "accuracy": accuracy,
        # ids as POST /v1/predict gives them (this process's own: a running agent cannot label them)
        "predictions": [
            {"id": pid, "label": lab, "score": s, "scores": [float(v) for v in row]}
            for pid, lab, s, row in zip(
                prediction_ids(len(pred_labels)), pred_labels, top_scores, scores, strict=False
            )
        ],
    }
    if m.manifest.anomaly_threshold is not None:
        doc["threshold"] = m.manifest.anomaly_threshold
    if output is not None:
        try:
            _write_output(output, doc, scores, labels)
        except OSError as e:
            _fail(ctx, AgentError(f"cannot write {str(output)!r}: {e.strerror}"), 1)
    if as_json:
        click.echo(
            json.dumps(
                doc
                if output is None
                else {k: v for k, v in doc.items() if k != "predictions"} | {"output": str(output)}
            )
        )
        return
    click.echo(f"model {m.ref.name} v{m.ref.version} ({m.runtime}), {scores.shape[0]} inputs")
    if output is None:
        click.echo(f"{'#':>6}  {'label':<12} {'score':>7}")
        for i, (lab, s) in enumerate(zip(pred_labels[:MAX_ROWS_PRINTED], top_scores, strict=False)):
            click.echo(f"{i:>6}  {lab:<12} {s:>7.4f}")
        if len(pred_labels) > MAX_ROWS_PRINTED:
            click.echo(f"... {len(pred_labels) - MAX_ROWS_PRINTED} more (use --output FILE or --json)")
    else:
        click.echo(f"wrote {output}")
    if accuracy is not None:
        click.echo(f"accuracy {accuracy:.4f} on {len(pred_labels)} labelled inputs")


def _print_values(
    ctx: click.Context, agent: Any, values: Any, y: Any, output: Path | None, as_json: bool
) -> None:
    """``predict`` for a regression bundle: the values per target in the user's units (and the
    mean absolute error per target when true values came with ``--label``)."""
    import numpy as np

    from device_agent.agent import prediction_ids

    names = agent.labels
    mae = None
    if y is not None:
        try:
            truth = np.asarray(y, dtype=np.float64).reshape(len(y), -1)
        except ValueError:
            _fail(ctx, AgentError("--label values must be numbers for a regression bundle"), 1)
            return
        if truth.shape[1] != len(names):
            _fail(
                ctx, AgentError(f"--label gives {truth.shape[1]} values per input, the model {len(names)}"), 1
            )
            return
        mae = {n: float(np.abs(values[:, j] - truth[:, j]).mean()) for j, n in enumerate(names)}
    m = agent.model
    doc = {
        "model": {**m.ref.to_dict(), "runtime": m.runtime},
        "task": "regression",
        "count": int(values.shape[0]),
        "mae": mae,
        "predictions": [
            {"id": pid, "values": {n: float(v) for n, v in zip(names, row, strict=True)}}
            for pid, row in zip(prediction_ids(values.shape[0]), values, strict=True)
        ],
    }
    if output is not None:
        try:
            if output.suffix.lower() == ".npy":
                np.save(output, values)
            elif output.suffix.lower() == ".json":
                output.write_text(json.dumps(doc) + "\n")
            elif output.suffix.lower() == ".csv":
                with open(output, "w", newline="") as fh:
                    w = csv.writer(fh)
                    w.writerow(names)
                    w.writerows([[f"{v:.7g}" for v in row] for row in values])
            else:
                raise OSError(0, f"unknown output type {output.suffix!r}; use .csv, .json or .npy")
        except OSError as e:
            _fail(ctx, AgentError(f"cannot write {str(output)!r}: {e.strerror}"), 1)
            return
    if as_json:
        shown = doc if output is None else {k: v for k, v in doc.items() if k != "predictions"}
        click.echo(json.dumps(shown | ({"output": str(output)} if output is not None else {})))
        return
    click.echo(f"model {m.ref.name} v{m.ref.version} ({m.runtime}), {values.shape[0]} inputs")
    if output is None:
        click.echo(f"{'#':>6}  " + " ".join(f"{n:>12}" for n in names))
        for i, row in enumerate(values[:MAX_ROWS_PRINTED]):
            click.echo(f"{i:>6}  " + " ".join(f"{v:>12.6g}" for v in row))
        if values.shape[0] > MAX_ROWS_PRINTED:
            click.echo(f"... {values.shape[0] - MAX_ROWS_PRINTED} more (use --output FILE or --json)")
    else:
        click.echo(f"wrote {output}")
    if mae is not None:
        click.echo("mean absolute error: " + ", ".join(f"{n} {v:.6g}" for n, v in mae.items()))


def _write_output(path: Path, doc: dict[str, Any], scores: Any, labels: list[str]) -> None:
    import numpy as np

    suffix = path.suffix.lower()
    if suffix == ".json":
        path.write_text(json.dumps(doc) + "\n")
    elif suffix == ".npy":
        np.save(path, scores)
    elif suffix == ".csv":
        with open(path, "w", newline="") as fh:
            w = csv.writer(fh)
            # an anomaly bundle's one output is its score, not a score per label
            width = scores.shape[1] if scores.ndim == 2 else len(labels)
            cols = (
                [f"score_{lab}" for lab in labels]
                if width == len(labels)
                else [f"output_{j}" for j in range(width)]
            )
            w.writerow(["label", "score", *cols])
            for p in doc["predictions"]:
                w.writerow([p["label"], f"{p['score']:.6g}", *[f"{v:.6g}" for v in p["scores"]]])
    else:
        raise OSError(0, f"unknown output type {suffix!r}; use .csv, .json or .npy")


# --------------------------------------------------------------------------------------------------
# bench


@main.command("bench")
@click.option("--bundle", "bundle", required=True, type=click.Path(path_type=Path), help="Bundle directory.")
@click.option(
    "--input",
    "input_path",
    type=click.Path(path_type=Path),
    help=".npy, .npz (array 'x') or .csv; default: inputs drawn within the baseline's ranges.",
)
@click.option("--label", help="CSV column or .npz array with true labels: report accuracy.")
@click.option(
    "--runs",
    type=click.IntRange(min=1),
    default=200,
    show_default=True,
    help="Timed predictions (at least one per input).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON document.")
@_bundle_run_options
@click.pass_context
def bench_cmd(
    ctx: click.Context,
    bundle: Path,
    input_path: Path | None,
    label: str | None,
    runs: int,
    as_json: bool,
    trusted_keys: tuple[Path, ...],
    runtime: str | None,
    threads: int | None,
) -> None:
    """Profile a bundle on this device: latency p50/p95, peak memory, accuracy, CPU (one sample at a time)."""
    from device_agent.bench import run_bench

    if label is not None and input_path is None:
        click.echo("Error: --label needs --input (the file holding the labels)", err=True)
        sys.exit(2)
    try:
        keys = _trusted_keys(trusted_keys)
        x = y = None
        if input_path is not None:
            x, y = read_inputs(input_path, label)
        doc = run_bench(
            bundle,
            x,
            y,
            runs=runs,
            runtime=runtime,
            threads=threads,
            trusted_keys=keys,
            input_name=input_path.name if input_path is not None else None,
        )
    except AgentError as e:
        _fail(ctx, e, 1)
        return
    if as_json:
        click.echo(json.dumps(doc))
        return
    b, cpu = doc["bundle"], doc["cpu"]
    click.echo(
        f"{b['name']} v{b['version']} ({b['target']}) in {doc['runtime']} {doc['runtime_version'] or ''}"
        f" with {doc['threads']} threads on {cpu['model'] or cpu['machine']} ({cpu['count']} CPUs;"
        f" {' '.join(cpu['numeric_flags']) or 'no listed SIMD flags'})"
    )
    acc = "-" if doc["accuracy"] is None else f"{100 * doc['accuracy']:.2f}%"
    peak = doc["peak_rss_bytes"]
    click.echo(
        f"{doc['runs']} predictions one at a time on {doc['samples']} inputs ({doc['input']}):"
        f" p50 {doc['latency_ms_p50']:.3f} ms, p95 {doc['latency_ms_p95']:.3f} ms;"
        f" peak RSS {'-' if peak is None else f'{peak / 2**20:.1f} MiB'}; accuracy {acc}"
    )


# --------------------------------------------------------------------------------------------------
# run and check


@main.command("run")
@config_option
@click.pass_context
def run_cmd(ctx: click.Context, config_path: Path) -> None:
    """Run the daemon: local API, statistics windows, MQTT telemetry with a disk outbox."""
    from device_agent.daemon import Daemon

    try:
        daemon = Daemon.from_file(config_path)
    except ConfigError as e:
        _fail(ctx, e, EX_CONFIG)
        return
    except AgentError as e:
        _fail(ctx, e, EX_CONFIG)
        return
    if daemon.api is not None:
        click.echo(f"edgefleet-agent listening on {daemon.api.address}", err=True)
    sys.exit(daemon.run_forever())


@main.command("check")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.pass_context
def check_cmd(ctx: click.Context, config_path: Path, as_json: bool) -> None:
    """Validate a config and its bundle (hashes, signature, smoke inference); exit 0 or 78."""
    from device_agent.agent import load_model
    from device_agent.config import check_files, load_config
    from device_agent.formats.manifest import VerifyPolicy

    try:
        cfg = load_config(config_path)
        keys = check_files(cfg)
        policy = VerifyPolicy(trusted_keys=keys, allow_unsigned=cfg.allow_unsigned, target=cfg.target)
        try:
            model = load_model(cfg.bundle, policy, cfg.runtime, cfg.threads)
        except AgentError as e:
            raise ConfigError(f"[agent] bundle {str(cfg.bundle)!r}: {e}") from None
    except AgentError as e:
        if as_json:
            click.echo(json.dumps({"ok": False, "error": str(e)}))
            sys.exit(EX_CONFIG)
        _fail(ctx, e, EX_CONFIG)
        return
    result = {
        "ok": True,
        "device_id": cfg.device_id,
        "fleet": cfg.fleet,
        "model": {**model.ref.to_dict(), "runtime": model.runtime},
        "signed": bool(keys),
        "mqtt": cfg.mqtt.safe_url if cfg.mqtt else None,
        "listen": cfg.listen,
        "state_dir": str(cfg.state_dir),
    }
    if as_json:
        click.echo(json.dumps(result))
        return
    warn = "" if keys else " (UNSIGNED bundles allowed: set trusted_keys for production)"
    click.echo(
        f"OK: {cfg.fleet}/{cfg.device_id} serves {model.ref.name} v{model.ref.version} with {model.runtime}; "
        f"mqtt {result['mqtt'] or 'off'}; api {cfg.listen or 'off'}{warn}"
    )


@main.command("status")
@config_option
@click.option("--json", "as_json", is_flag=True, help="Print the agent's /v1/health document as JSON.")
@click.pass_context
def status_cmd(ctx: click.Context, config_path: Path, as_json: bool) -> None:
    """Ask the running agent (GET /v1/health at [api] listen): model, MQTT, capture, alert state."""
    from device_agent.config import load_config
    from device_agent.statuscmd import StatusError, fetch_health, render

    try:
        cfg = load_config(config_path)
    except AgentError as e:
        _fail(ctx, e, EX_CONFIG)
        return
    try:
        health = fetch_health(cfg)
    except ConfigError as e:  # the token file
        _fail(ctx, e, EX_CONFIG)
        return
    except StatusError as e:
        _fail(ctx, e, 1)
        return
    click.echo(json.dumps(health, indent=1) if as_json else render(health))


if __name__ == "__main__":
    main()
