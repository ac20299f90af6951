"""The Python API: ``Agent(bundle).predict(x)`` with statistics windows and safe model switching.

``Agent`` is what applications embed and what the daemon serves over HTTP. It verifies a bundle
(every file's sha256, the signature when keys are trusted), loads it in one runtime, runs a smoke
inference, and keeps a statistics window that closes every ``window_s`` or ``window_max_samples``
predictions; closed windows go to ``on_window`` (the daemon's telemetry writer).

This module is also the device package's public face for the host: besides ``device_agent.formats``
and ``device_agent.runtimes``, ``toolchain`` and ``benchmarks`` import only the names listed in
``__all__`` here (``tests/test_architecture.py``). ``Daemon``, ``load_config`` and ``EmbeddedBroker``
(to run an agent in-process, as ``edgefleet demo`` does) are loaded on first use.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from device_agent.errors import AgentError
from device_agent.formats.manifest import BundleError, Manifest, VerifyPolicy, manifest_sha256, verify_bundle
from device_agent.formats.stats import ProfileSpec, StatsError, baseline_from_dict
from device_agent.formats.telemetry import ModelRef
from device_agent.inference import InputError, Predictor, dequantize, quantize
from device_agent.kernels import Summary
from device_agent.windows import VALUE_FUNCTIONS, ClosedWindow, Window

if TYPE_CHECKING:
    from device_agent.broker import EmbeddedBroker
    from device_agent.config import load_config
    from device_agent.daemon import Daemon

log = logging.getLogger(__name__)
BASELINE_MAX_BYTES = 16 * 1024 * 1024
PREDICT_BATCH = 64  # samples per call of the agent CLI's offline predict (the build's parity check too)


def agent_version() -> str:
    """Return the installed edgefleet version (the agent's version on the wire)."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("edgefleet")
    except (ImportError, PackageNotFoundError):
        return "0.0.0"


class Prediction(NamedTuple):
    """Scores (n, K) for a batch, the top-1 label and score per sample, and the model that ran.

    A named tuple: the native single-sample path makes one without running Python code.
    """

    outputs: np.ndarray
    labels: list[str]
    scores: list[float]
    model: ModelRef

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form the HTTP API sends."""
        return {
            "outputs": [[float(v) for v in row] for row in self.outputs],
            "labels": self.labels,
            "scores": self.scores,
            "model": self.model.to_dict(),
        }


@dataclass
class LoadedModel:
    """A verified bundle loaded in a runtime, with its identity and baseline spec."""

    path: Path
    manifest: Manifest
    ref: ModelRef
    spec: ProfileSpec
    predictor: Predictor

    @property
    def runtime(self) -> str:
        return self.predictor.runtime


def load_model(
    bundle_dir: str | Path,
    policy: VerifyPolicy,
    runtime: str | None = None,
    threads: int | None = None,
) -> LoadedModel:
    """Verify a bundle (all hashes, signature per ``policy``), load it and run a smoke inference."""
    path = Path(bundle_dir)
    sha_before = manifest_sha256(path)
    manifest = verify_bundle(path, policy)
    sha = manifest_sha256(path)
    if sha != sha_before:
        raise BundleError(f"bundle {str(path)!r} changed while it was being verified; try again")
    base_path = path / manifest.baseline
    if base_path.stat().st_size > BASELINE_MAX_BYTES:
        raise BundleError(f"{manifest.baseline} is larger than {BASELINE_MAX_BYTES} bytes")
    try:
        baseline = baseline_from_dict(json.loads(base_path.read_bytes()))
    except (ValueError, StatsError) as e:
        raise BundleError(f"{manifest.baseline} of bundle {str(path)!r} is invalid: {e}") from None
    spec = baseline.spec
    predictor = Predictor(path, manifest, runtime=runtime, threads=threads)
    if tuple(spec.features.input_shape) != tuple(predictor.sample_shape):
        raise BundleError(
            f"baseline profiles inputs of shape {spec.features.input_shape},"
            f" the model takes {predictor.sample_shape}"
        )
    if len(spec.labels) != len(manifest.labels):
        raise BundleError(f"baseline has {len(spec.labels)} labels, the manifest {len(manifest.labels)}")
    # an anomaly model returns one score per sample; the agent turns it into the two labels
    _smoke(predictor, spec, 1 if manifest.anomaly_threshold is not None else len(manifest.labels))
    ref = ModelRef(manifest.name, manifest.version, sha)
    return LoadedModel(path, manifest, ref, spec, predictor)


def _smoke(predictor: Predictor, spec: ProfileSpec, n_labels: int) -> None:
    """Run one inference on a typical input (the baseline means) and check the output's shape and values.

    ``n_labels`` is the number of outputs the model must give per sample (1 for an anomaly score).
    """
    shape = predictor.sample_shape
    if spec.features.kind == "elements":
        base = spec.new_profile()  # empty: use the midpoint of each feature's edges instead of data
        mids = [
            (e[0] + e[-1]) / 2.0 for e in (base.inputs.edge_list(j) for j in range(base.inputs.n_features))
        ]
        x = np.asarray(mids, dtype=np.float32).reshape((1, *shape))
    else:
        x = np.zeros((1, *shape), dtype=np.float32)
    try:
        out = predictor.predict(x)
    except AgentError:
        raise
    except Exception as e:  # a runtime that cannot run the model must not replace a working one
        raise BundleError(f"smoke inference failed in {predictor.runtime}: {type(e).__name__}: {e}") from None
    if out.shape != (1, n_labels) or not np.isfinite(out).all():
        raise BundleError(
            f"smoke inference returned shape {out.shape} (want (1, {n_labels})) or non-finite scores"
        )


def predicted_classes(pred: Prediction, labels: Sequence[str]) -> list[int]:
    """Return each sample's predicted class index: the top-1 output, or for a model with one output
    per sample (an anomaly score) the index of the label the agent gave it."""
    out = np.asarray(pred.outputs)
    index = {lab: i for i, lab in enumerate(labels)}
    if out.ndim == 2 and out.shape[1] != len(labels) and all(lab in index for lab in pred.labels):
        return [index[lab] for lab in pred.labels]
    # (also when the serving model changed since: feedback then does not count for it anyway)
    return [int(v) for v in out.reshape(len(out), -1).argmax(axis=1)]


def prediction_ids(n: int) -> list[str]:
    """``n`` new prediction ids: 22 URL-safe characters of 128 random bits each."""
    import secrets

    return [secrets.token_urlsafe(16) for _ in range(n)]


class Agent:
    """Run a bundle with statistics: ``Agent("bundle/").predict(x)``.

    ``trusted_keys`` are raw 32-byte Ed25519 public keys (``device_agent.formats.keys.load_trusted_keys``).
    ``allow_unsigned=None`` allows unsigned bundles only when no key is trusted, with a warning.
    ``on_window`` receives each ``ClosedWindow`` (called without the Agent's lock held).
    Thread-safe: inference is serialized (interpreters are not thread-safe).
    """

    def __init__(
        self,
        bundle: str | Path,
        *,
        trusted_keys: Sequence[bytes] = (),
        allow_unsigned: bool | None = None,
        runtime: str | None = None,
        threads: int | None = None,
        target: str | None = None,
        window_s: float = 60.0,
        window_max_samples: int | None = None,
        on_window: Callable[[ClosedWindow], None] | None = None,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if allow_unsigned is None:
            allow_unsigned = not trusted_keys
            if allow_unsigned:
                log.warning(
                    "no trusted signing key given: unsigned bundles are accepted (hashes are still checked)"
                )
        self.policy = VerifyPolicy(
            trusted_keys=tuple(trusted_keys), allow_unsigned=allow_unsigned, target=target
        )
        self.runtime_override = runtime
        self.threads = threads
        self.window_s = float(window_s)
        self.window_max_samples = window_max_samples
        self.on_window = on_window
        self._clock = clock
        self._mono = monotonic
        self._lock = threading.Lock()
        self._model = load_model(bundle, self.policy, runtime, threads)
        self._window = self._new_window(self._model)
        self._closed_predictions = 0  # in windows closed so far (predictions_total adds the open one)
        self._last_batch_n = 0  # size of the last batch that took the general path
        self.violations_total = 0
        # Called with (input as given, Prediction, the caller's prediction ids or None) after each
        # successful predict (capture); never raises into it.
        self.on_predict: Callable[[Any, Prediction, list[str] | None], None] | None = None
        # Called with (prediction id, true label, its class index) after feedback counted a label
        # (capture sends it to the fleet store when the sample was captured); never raises into it.
        self.on_label: Callable[[str, str, int], None] | None = None

    # ---------------------------------------------------------------------------------------------
    @property
    def model(self) -> LoadedModel:
        """The model serving now."""
        return self._model

    @property
    def labels(self) -> list[str]:
        return self._model.manifest.labels

    @property
    def predictions_total(self) -> int:
        """Samples predicted since start (every window's count)."""
        with self._lock:
            return self._closed_predictions + self._window.count

    def _new_window(self, model: LoadedModel) -> Window:
        """A window for ``model``, with the model's native runners bound to it."""
        w = Window(model.spec, model.ref, self._clock(), self._mono())
        if model.spec.has_values:  # a number per sample (regression, anomaly): see windows.VALUE_FUNCTIONS
            w.values_of = VALUE_FUNCTIONS.get(model.manifest.task_type)
        pred = model.predictor
        self._one: Callable[[Any], Prediction | None] | None = None
        self._batch_one: Callable[[Any], Prediction | None] | None = None
        if model.manifest.anomaly_threshold is not None:
            return w  # the native runners record class scores; an anomaly score takes _run_anomaly
        runner, batch = pred.runner, pred.current_batch_runner
        if runner is not None and self._bind(runner, w, model):
            self._one = runner.predict
            if batch is not None and self._bind(batch, w, model):
                self._batch_one = batch.predict
        return w

    def _bind(self, runner: Any, w: Window, model: LoadedModel) -> bool:
        """Bind a ``kernels.Runner`` to window ``w``; False when the window cannot take it."""
        if runner.batch > w.rows:
            return False
        return w.bind(runner, self._lock, Prediction, tuple(model.manifest.labels), model.ref)

    def predict(self, x: Any, ids: list[str] | None = None) -> Prediction:
        """Return scores, top-1 labels and scores for one sample or a batch of float inputs.

        ``ids``: the prediction ids the caller gives back for these samples (the HTTP API's), handed
        to ``on_predict`` so a captured sample carries the id its feedback will name.

        Raises ``InputError`` (kind ``shape``, ``dtype`` or ``nan``) for inputs that do not fit the
        model; each is counted as a schema violation in the current window.
        """
        one = self._one
        if one is not None:
            # One float32 sample in one native call (kernels.Runner): check, quantize, run, decode
            # and the window's rows, under self._lock; then a batch of the size the batch runner
            # was made for. None: not such an input, or NaN (the general path below refuses it with
            # the reason), or a model switch or another batch size happened meanwhile.
            got: Prediction | None = one(x)
            if got is None:
                batch = self._batch_one
                if batch is not None:
                    got = batch(x)
            if got is not None:
                if self.window_max_samples is not None:
                    self._rotate_if_full()
                return got if self.on_predict is None else self._observed(x, got, ids)
        got = self._predict(x)
        return got if self.on_predict is None else self._observed(x, got, ids)

    def _observed(self, x: Any, got: Prediction, ids: list[str] | None) -> Prediction:
        hook = self.on_predict
        if hook is not None:
            try:
                hook(x, got, ids)
            except Exception:  # capture must never break inference
                log.exception("on_predict hook failed")
        return got

    def _predict(self, x: Any) -> Prediction:
        """``predict`` for anything but a single float32 sample on the native path."""
        with self._lock:
            m = self._model
            pred = m.predictor
            summary: Summary | None = None
            encoded: np.ndarray | None = None
            try:
                arr = pred.check_shape(np.asarray(x) if not isinstance(x, np.ndarray) else x)
                # Both refuse NaN/infinity in the pass that writes the model's input.
                if arr.shape[0] == 1:
                    summary = pred.load_one(arr)
                else:
                    encoded = pred.encode_checked(arr)
            except InputError as e:
                self._window.add_violation(e.kind)
                self.violations_total += 1
                raise
            except (ValueError, TypeError) as e:  # ragged nested lists and the like
                self._window.add_violation("shape")
                self.violations_total += 1
                raise InputError("shape", f"input is not a rectangular array of numbers ({e})") from None
            threshold = m.manifest.anomaly_threshold
            if threshold is not None:
                scores, tops, top_scores = self._run_anomaly(m, arr, encoded, threshold)
            elif summary is not None:
                scores, tops, top_scores = self._run_one(m, arr, summary)
            else:
                assert encoded is not None
                n = arr.shape[0]
                held = pred.current_batch_runner
                if held is not None and held.batch != n:
                    # This batch resizes the batch interpreter: its runner lets go of it first.
                    self._batch_one = None
                    pred.close_batch_runner()
                scores, tops, top_scores = self._run_batch(m, arr, encoded)
                if n == self._last_batch_n and pred.current_batch_runner is None and threshold is None:
                    # the same size twice in a row: the native path from the next batch on
                    runner = pred.batch_runner(n)
                    if runner is not None and self._one is not None and self._bind(runner, self._window, m):
                        self._batch_one = runner.predict
                self._last_batch_n = n
        if self.window_max_samples is not None:
            self._rotate_if_full()
        labels = m.manifest.labels
        # For an anomaly model ``outputs`` is the score (n, 1) and ``scores`` the same score per sample.
        return Prediction(
            outputs=scores,
            labels=[labels[i] if i < len(labels) else str(i) for i in tops],
            scores=top_scores,
            model=m.ref,
        )

    def _run_one(
        self, m: LoadedModel, arr: np.ndarray, summary: Summary
    ) -> tuple[np.ndarray, list[int], list[float]]:
        """Run the sample ``load_one`` wrote and record it (the native per-sample path)."""
        pred = m.predictor
        table = pred.out_table
        # An 8-bit output is decoded by one native call after the run, into an array made before
        # it, while numpy's code is still in the cache (the run evicts it).
        into = None if table is None else (table, np.empty((1, len(m.manifest.labels)), dtype=np.float32))
        t0 = time.perf_counter()
        raw = pred.run_loaded()
        latency_ms = (time.perf_counter() - t0) * 1000.0
        if into is None:
            scores = pred.scores(raw)
            top, score = self._window.record_one(arr, scores, latency_ms, summary)
        else:
            table, scores = into
            top, score = self._window.record_one(arr, scores, latency_ms, summary, (raw, table))
        return scores, [top], [score]

    def _run_anomaly(
        self, m: LoadedModel, arr: np.ndarray, encoded: np.ndarray | None, threshold: float
    ) -> tuple[np.ndarray, list[int], list[float]]:
        """Run an anomaly model on a loaded sample (``encoded`` None) or a batch, and record it.

        The model outputs the score (n, 1); a sample is ``anomaly`` (label 1) when it is above the
        manifest's threshold. The window counts the decision as a class (one-hot rows), so the
        anomaly rate per window and device is the existing class-count machinery.
        """
        pred = m.predictor
        t0 = time.perf_counter()
        out = pred.scores(pred.run_loaded()) if encoded is None else pred.run_encoded(encoded)
        latency_ms = (time.perf_counter() - t0) * 1000.0
        # THE per-sample anomaly score (reconstruction MSE, float64 (n,)), in one place: the window's
        # score histogram (issue 15's Profile.update_values) is to be fed from here.
        anomaly_scores = out[:, 0].astype(np.float64)
        flagged = anomaly_scores > threshold
        decisions = np.zeros((len(flagged), 2), dtype=np.float64)
        decisions[np.arange(len(flagged)), flagged.astype(np.int64)] = 1.0
        self._window.record(arr, decisions, latency_ms)
        return out, flagged.astype(np.int64).tolist(), anomaly_scores.tolist()

    def _run_batch(
        self, m: LoadedModel, arr: np.ndarray, encoded: np.ndarray
    ) -> tuple[np.ndarray, list[int], list[float]]:
        """Run a batch ``encode_checked`` returned and record it."""
        t0 = time.perf_counter()
        scores = m.predictor.run_encoded(encoded)
        latency_ms = (time.perf_counter() - t0) * 1000.0
        self._window.record(arr, scores, latency_ms)
        top = scores.argmax(axis=1)
        return scores, top.tolist(), scores[np.arange(len(top)), top].tolist()

    def record_label(self, true_label: str, predicted: int, model_sha256: str) -> bool | None:
        """Count the true label of an earlier prediction (top-1 index ``predicted``) in the open window.

        Returns True when the prediction was right, False when wrong, and None (nothing counted)
        when ``model_sha256`` is not the model serving now. Raises ``ValueError`` for a label the
        model does not have.
        """
        with self._lock:
            m = self._model
            labels = m.manifest.labels
            if true_label not in labels:
                raise ValueError(true_label)
            if m.ref.sha256 != model_sha256:
                return None
            return self._window.profile.add_label(labels.index(true_label), predicted)

    def record_violation(self, kind: str) -> None:
        """Count a refused request that never reached the model (bad JSON, for instance)."""
        with self._lock:
            self._window.add_violation(kind)
            self.violations_total += 1

    # ---------------------------------------------------------------------------------------------
    def _rotate(self) -> ClosedWindow:
        closed = self._window.close(self._clock())
        self._closed_predictions += closed.count
        self._window = self._new_window(self._model)
        return closed

    def _rotate_if_full(self) -> None:
        """Close the window once it holds ``window_max_samples`` predictions."""
        closed = None
        with self._lock:
            if self.window_max_samples is not None and self._window.count >= self.window_max_samples:
                closed = self._rotate()
        if closed is not None:
            self._emit(closed)

    def _emit(self, closed: ClosedWindow) -> None:
        if self.on_window is None:
            return
        try:
            self.on_window(closed)
        except Exception:  # the telemetry side must never break inference
            log.exception("window callback failed; window seq lost")

    def window_due_in(self) -> float:
        """Seconds until the current window reaches ``window_s`` (<= 0 when due)."""
        return self.window_s - (self._mono() - self._window.start_mono)

    def poll_window(self) -> ClosedWindow | None:
        """Close the current window when ``window_s`` has passed; return it (also sent to on_window)."""
        with self._lock:
            if self._mono() - self._window.start_mono < self.window_s:
                return None
            closed = self._rotate()
        self._emit(closed)
        return closed

    def close_window(self) -> ClosedWindow:
        """Close the current window now (shutdown, model switch) and return it."""
        with self._lock:
            closed = self._rotate()
        self._emit(closed)
        return closed

    def window_count(self) -> int:
        """Predictions in the open window."""
        with self._lock:
            return self._window.count

    # ---------------------------------------------------------------------------------------------
    def switch_bundle(self, path: str | Path, min_version: int | None = None) -> LoadedModel:
        """Verify and load another bundle, then swap it in; the old one serves until the swap.

        The open window closes with the old model (its spec may differ). Raises AgentError (and keeps
        the old model) when the new bundle fails verification, loading or the smoke inference, or
        when its verified version is below ``min_version`` (the anti-rollback floor).
        """
        new = load_model(path, self.policy, self.runtime_override, self.threads)
        if min_version is not None and new.ref.version < min_version:
            raise AgentError(
                f"bundle {new.ref.name} v{new.ref.version} is below the anti-rollback floor v{min_version}"
            )
        with self._lock:
            closed = self._window.close(self._clock())
            self._closed_predictions += closed.count
            # A caller holding an old runner's predict now gets None: the general path.
            self._model.predictor.close_runners()
            self._model = new
            self._window = self._new_window(new)
        self._emit(closed)
        return new


_LAZY = {
    "Daemon": "device_agent.daemon",
    "load_config": "device_agent.config",
    "EmbeddedBroker": "device_agent.broker",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'device_agent.agent' has no attribute {name!r}")


__all__ = [
    "Agent",
    "AgentError",
    "BundleError",
    "InputError",
    "Prediction",
    "Predictor",
    "PREDICT_BATCH",
    "agent_version",
    "prediction_ids",
    "predicted_classes",
    "dequantize",
    "load_model",
    "quantize",
    "Daemon",
    "load_config",
    "EmbeddedBroker",
]
