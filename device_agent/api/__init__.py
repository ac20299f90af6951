"""The local HTTP API: predict, health and Prometheus metrics, on a bounded server (stdlib + numpy).

``POST /v1/predict`` with ``{"inputs": [...]}`` (one sample or a batch), an ``application/x-npy``
body, or raw tensor bytes (``application/octet-stream`` with ``X-Shape`` and ``X-Dtype`` headers) ->
``{"outputs", "labels", "scores", "model", "ids"}`` (one prediction id per sample, for any body type);
``POST /v1/feedback`` with ``{"id", "label"}`` or ``{"items": [...]}`` counts true labels of recent
predictions in the statistics window (``device_agent.feedback``); ``GET /v1/health``; ``GET /metrics`` (Prometheus text
format 0.0.4). Listens on ``HOST:PORT`` (127.0.0.1 by default) or a Unix socket (``unix:/path``).

The server holds what a client can make it hold to fixed bounds (``[api]`` in the config): one I/O
thread reads every connection without blocking and hands only complete requests to a fixed pool of
worker threads, so idle, slow or half-sent requests hold no thread; a request must arrive within
``request_timeout_s`` (408) and an idle keep-alive connection closes after ``idle_timeout_s``; a body
is limited by the size the model's input needs for ``max_batch`` samples (capped by
``max_body_bytes``, 413), all bodies in memory at once by ``buffer_bytes`` (503), connections by
``max_connections``, JSON nesting by ``max_json_depth`` (400). A client that goes away is counted and
logged in one rate-limited line, never with a traceback. With ``token_file`` every request needs
``Authorization: Bearer <token>`` (401). Bad input is a 400 with a one-line error, counted as a schema
violation.

The package: ``bodies`` decodes request bodies, ``server`` is the bounded HTTP server, and this module
answers requests (``ApiServer.handle``: routes, auth, predict) and renders ``/metrics``.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from device_agent.agent import Agent, predicted_classes, prediction_ids
from device_agent.api.bodies import BadBody, JsonInputs, _dumps, _loads, json_depth, load_npy, load_raw
from device_agent.api.server import HttpServer, Request, Response
from device_agent.config import ApiSettings, read_token
from device_agent.errors import AgentError
from device_agent.feedback import HTTP_CODE, FeedbackBook, Outcome
from device_agent.inference import InputError

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
PREFIX = "edgefleet_agent"
JSON_BYTES_PER_VALUE = 32  # "-1.2345678901234567e-05, " and then some: what one number costs in JSON
BODY_SLACK_BYTES = 4096  # the JSON object around the numbers, the .npy header
FEEDBACK_MAX_ITEMS = 4096  # labels in one POST /v1/feedback {"items": [...]}
FEEDBACK_ID_MAX_CHARS = 64


class Metrics:
    """Request counters and a latency histogram for /metrics. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = {}
        self.errors: dict[str, int] = {}
        self.buckets = [0] * (len(LATENCY_BUCKETS_S) + 1)
        self.latency_sum_s = 0.0
        self.latency_count = 0

    def observe(self, path: str, code: int, seconds: float | None = None, error: str | None = None) -> None:
        with self._lock:
            key = (path, code)
            self.requests[key] = self.requests.get(key, 0) + 1
            if error:
                self.errors[error] = self.errors.get(error, 0) + 1
            if seconds is not None:
                i = 0
                while i < len(LATENCY_BUCKETS_S) and seconds > LATENCY_BUCKETS_S[i]:
                    i += 1
                self.buckets[i] += 1
                self.latency_sum_s += seconds
                self.latency_count += 1

    def render(self, gauges: dict[str, float], model: dict[str, Any]) -> str:
        """Return the Prometheus text exposition."""
        out: list[str] = []

        def head(name: str, kind: str, text: str) -> None:
            out.append(f"# HELP {PREFIX}_{name} {text}")
            out.append(f"# TYPE {PREFIX}_{name} {kind}")

        with self._lock:
            head("http_requests_total", "counter", "HTTP requests by path and status code.")
            for (path, code), n in sorted(self.requests.items()):
                out.append(f'{PREFIX}_http_requests_total{{path="{_esc(path)}",code="{code}"}} {n}')
            head("http_errors_total", "counter", "Refused or failed HTTP requests by reason.")
            for kind, n in sorted(self.errors.items()):
                out.append(f'{PREFIX}_http_errors_total{{reason="{_esc(kind)}"}} {n}')
            head(
                "predict_latency_seconds",
                "histogram",
                "POST /v1/predict latency (request parsed to response ready).",
            )
            cum = 0
            for edge, n in zip(LATENCY_BUCKETS_S, self.buckets, strict=False):
                cum += n
                out.append(f'{PREFIX}_predict_latency_seconds_bucket{{le="{edge:g}"}} {cum}')
            cum += self.buckets[-1]
            out.append(f'{PREFIX}_predict_latency_seconds_bucket{{le="+Inf"}} {cum}')
            out.append(f"{PREFIX}_predict_latency_seconds_sum {self.latency_sum_s:.9g}")
            out.append(f"{PREFIX}_predict_latency_seconds_count {self.latency_count}")
        docs = {
            "predictions_total": ("counter", "Samples predicted (all APIs)."),
            "schema_violations_total": ("counter", "Inputs refused as not fitting the model (all APIs)."),
            "outbox_depth": ("gauge", "Telemetry windows waiting for a broker acknowledgement."),
            "outbox_bytes": ("gauge", "Bytes of telemetry waiting for a broker acknowledgement."),
            "dropped_windows_total": ("counter", "Windows dropped because the outbox was full."),
            "windows_total": ("counter", "Windows closed and stored since start."),
            "mqtt_connected": ("gauge", "1 when connected to the MQTT broker."),
            "reloads_failed_total": ("counter", "Bundles refused by hot reload since start."),
            "rollback_floor_version": (
                "gauge",
                "The anti-rollback floor: the highest version ever activated.",
            ),
            "rollback_refused_total": (
                "counter",
                "Bundles refused as below the anti-rollback floor since start.",
            ),
            "in_alert": ("gauge", "1 while the fleet's alert command says this device is in drift alert."),
            "alert_commands_applied_total": ("counter", "Alert commands from the fleet applied since start."),
            "alert_commands_refused_total": (
                "counter",
                "Alert commands refused since start (malformed, for another device, or stale).",
            ),
            "http_connections": ("gauge", "Open HTTP connections."),
            "http_workers": ("gauge", "HTTP request worker threads (a fixed pool)."),
        }
        for name, value in gauges.items():
            kind, text = docs.get(name, ("gauge", name))
            head(name, kind, text)
            out.append(f"{PREFIX}_{name} {value:.10g}")
        head("model_info", "gauge", "The model serving now (value is always 1).")
        out.append(
            f'{PREFIX}_model_info{{name="{_esc(model["name"])}",version="{model["version"]}",'
            f'sha256="{model["sha256"]}",runtime="{_esc(model["runtime"])}"}} 1'
        )
        head("model_version", "gauge", "Version of the model serving now.")
        out.append(f"{PREFIX}_model_version {model['version']}")
        return "\n".join(out) + "\n"


_FEEDBACK_OUTCOMES = {o.value for o in Outcome}
_FEEDBACK_REASONS = {
    Outcome.UNKNOWN: "id {id!r} was not issued by this agent since it started (ids do not survive a restart)",
    Outcome.EXPIRED: "id {id!r} is too old: only the {max} most recent prediction ids can be labelled"
    " ([api] feedback_max_ids)",
    Outcome.ALREADY: "id {id!r} was labelled before; the first label counts",
    Outcome.MODEL_CHANGED: "id {id!r} was predicted by a model that no longer serves; its label is not counted",
}


def _samples_in(x: Any, sample_ndim: int) -> int:
    """How many samples a parsed body holds (a batch has one axis more than a sample); 1 otherwise."""
    if isinstance(x, np.ndarray):
        return int(x.shape[0]) if x.ndim == sample_ndim + 1 else 1
    depth, v = 0, x
    while isinstance(v, list) and v:
        v, depth = v[0], depth + 1
    return len(x) if depth == sample_ndim + 1 and isinstance(x, list) else 1


def _id_of(item: Any) -> Any:
    return item.get("id") if isinstance(item, dict) and isinstance(item.get("id"), (str, int)) else None


def _esc(s: str) -> str:
    return str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class ApiServer:
    """Serve the API for an Agent on ``listen`` (``HOST:PORT`` or ``unix:/path``) within ``settings``."""

    def __init__(
        self,
        agent: Agent,
        listen: str,
        health: Callable[[], dict[str, Any]] | None = None,
        gauges: Callable[[], dict[str, float]] | None = None,
        settings: ApiSettings | None = None,
    ) -> None:
        self.agent = agent
        self.metrics = Metrics()
        self.settings = settings or ApiSettings()
        self._health = health
        self._gauges = gauges
        self.listen = listen
        self.token = read_token(self.settings.token_file) if self.settings.token_file else None
        self._json = JsonInputs(self.settings.max_json_depth)
        self._limit: tuple[Any, int] = (None, 0)
        self.feedback = FeedbackBook(self.settings.feedback_max_ids)
        self.server = HttpServer(self, listen, self.settings)
        self._serving = False

    @property
    def address(self) -> str:
        """Where it listens (``HOST:PORT`` with the real port, or ``unix:/path``)."""
        if self.listen.startswith("unix:"):
            return self.listen
        host, port = self.server.server_address[:2]
        return f"{host}:{port}"

    def body_limit(self) -> int:
        """The largest body accepted: ``max_batch`` samples of the model's input as JSON, within the cap."""
        model = self.agent.model
        key, limit = self._limit
        if key is not model:
            n = int(np.prod(model.predictor.sample_shape))
            limit = min(
                self.settings.max_body_bytes,
                BODY_SLACK_BYTES + self.settings.max_batch * n * JSON_BYTES_PER_VALUE,
            )
            self._limit = (model, limit)
        return limit

    def stats(self) -> dict[str, Any]:
        """Connection and worker figures for /v1/health."""
        return {
            "connections": len(self.server.conns),
            "workers": self.settings.workers,
            "buffered_bytes": self.server.buffered_bytes,
            "body_limit_bytes": self.body_limit(),
            "auth": self.token is not None,
            "errors": dict(self.metrics.errors),
            "feedback": self.feedback.snapshot(),
        }

    def health(self) -> dict[str, Any]:
        if self._health is not None:
            doc = self._health()
        else:
            m = self.agent.model
            doc = {"status": "ok", "model": {**m.ref.to_dict(), "runtime": m.runtime}}
        return {**doc, "api": self.stats()}

    def metrics_text(self) -> str:
        m = self.agent.model
        gauges: dict[str, float] = (
            self._gauges()
            if self._gauges is not None
            else {
                "predictions_total": self.agent.predictions_total,
                "schema_violations_total": self.agent.violations_total,
            }
        )
        gauges = {**gauges, "http_connections": len(self.server.conns), "http_workers": self.settings.workers}
        for outcome, n in self.feedback.snapshot().items():
            if outcome in _FEEDBACK_OUTCOMES:
                gauges[f"feedback_{outcome}_total"] = n
        return self.metrics.render(gauges, {**m.ref.to_dict(), "runtime": m.runtime})

    # ------------------------------------------------------------------ requests
    def handle(self, req: Request) -> Response:
        """Answer one complete request (runs on a worker thread)."""
        path = req.target.split("?", 1)[0]
        if self.token is not None and not self._authorized(req):
            self.metrics.observe(
                path if path in ("/v1/predict", "/v1/health", "/metrics") else "other", 401, error="auth"
            )
            self.server.trouble.note(
                "auth", "refused a request without the right bearer token", logging.WARNING
            )
            return Response(
                401,
                _dumps({"error": "send Authorization: Bearer <the token in [api] token_file>"}),
                headers=(("WWW-Authenticate", 'Bearer realm="edgefleet-agent"'),),
            )
        if req.method == "GET":
            if path == "/v1/health":
                self.metrics.observe(path, 200)
                return Response(200, _dumps(self.health()))
            if path == "/metrics":
                self.metrics.observe(path, 200)
                return Response(200, self.metrics_text().encode(), "text/plain; version=0.0.4; charset=utf-8")
            if path == "/v1/predict":
                return self._fail(
                    405, 'use POST /v1/predict with a JSON body {"inputs": [...]}', "method", path
                )
            return self._fail(
                404,
                f"no such endpoint {path[:100]!r}; try /v1/predict, /v1/health or /metrics",
                "not_found",
                "other",
            )
        if req.method == "POST":
            if path == "/v1/feedback":
                return self._feedback(req, path)
            if path != "/v1/predict":
                return self._fail(
                    404,
                    f"no such endpoint {path[:100]!r}; POST to /v1/predict or /v1/feedback",
                    "not_found",
                    "other",
                )
            return self._predict(req, path)
        return self._fail(
            405, f"method {req.method[:20]!r} is not supported; use GET or POST", "method", "other"
        )

    def _authorized(self, req: Request) -> bool:
        got = req.headers.get("authorization", "")
        want = "Bearer " + (self.token or "")
        return hmac.compare_digest(got.encode("latin-1", "replace"), want.encode("latin-1"))

    def _fail(self, code: int, message: str, reason: str, path: str) -> Response:
        self.metrics.observe(path, code, error=reason)
        return Response(code, _dumps({"error": message}))

    def _predict(self, req: Request, path: str) -> Response:
        t0 = time.perf_counter()
        agent = self.agent
        ctype = req.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        try:
            if ctype == "application/x-npy":
                x: Any = load_npy(req.body)
            elif ctype == "application/octet-stream":
                x = load_raw(req.body, req.headers.get("x-shape"), req.headers.get("x-dtype"))
            else:  # JSON, also without a Content-Type (curl -d sends a form type)
                x = self._json.fast(req.body, tuple(agent.model.predictor.sample_shape))
                if x is None:
                    x = self._json.general(req.body)
        except BadBody as e:
            agent.record_violation(e.kind)
            log.warning("bad /v1/predict body (%s): %r", e, req.body[:120])
            return self._fail(400, str(e), e.kind, path)
        ids = prediction_ids(_samples_in(x, len(agent.model.predictor.sample_shape)))
        try:
            pred = agent.predict(x, ids)
        except InputError as e:
            log.warning("refused input (%s): %s", e.kind, e)
            return self._fail(400, str(e), e.kind, path)
        except AgentError as e:
            return self._fail(500, str(e), "model", path)
        except Exception as e:  # the daemon keeps serving whatever one request does
            log.exception("predict failed")
            return self._fail(500, f"internal error: {type(e).__name__}", "internal", path)
        outputs = np.asarray(pred.outputs)
        if len(ids) != len(pred.labels):
            ids = prediction_ids(len(pred.labels))
        self.feedback.remember(ids, predicted_classes(pred, agent.labels), pred.model.sha256)
        # pred.to_dict(), with the score matrix converted in one call (the same Python floats)
        doc = {
            "outputs": outputs.tolist(),
            "labels": pred.labels,
            "scores": pred.scores,
            "model": pred.model.to_dict(),
            "ids": ids,
        }
        if agent.model.manifest.task_type == "regression":  # the values per target, user's units
            names = agent.labels
            doc["values"] = [dict(zip(names, row, strict=True)) for row in doc["outputs"]]
        payload = _dumps(doc)
        self.metrics.observe(path, 200, seconds=time.perf_counter() - t0)
        return Response(200, payload)

    def _feedback(self, req: Request, path: str) -> Response:
        """``POST /v1/feedback``: count true labels of earlier predictions (one, or ``items``)."""
        try:
            if json_depth(req.body) > 4:
                raise ValueError("nests too deep")
            doc = _loads(req.body)
        except ValueError as e:
            return self._fail(400, f"body is not a JSON object ({str(e)[:60]})", "feedback_body", path)
        if isinstance(doc, dict) and set(doc) == {"items"}:
            items = doc["items"]
            if not isinstance(items, list) or not 1 <= len(items) <= FEEDBACK_MAX_ITEMS:
                return self._fail(
                    400,
                    f'"items" must be a list of 1 to {FEEDBACK_MAX_ITEMS} {{"id", "label"}} objects',
                    "feedback_body",
                    path,
                )
            results = []
            for item in items:
                outcome, message = self._label_one(item)
                results.append(
                    {"id": _id_of(item), "outcome": outcome.value, **({"error": message} if message else {})}
                )
            counted = sum(r["outcome"] in ("correct", "incorrect") for r in results)
            self.metrics.observe(path, 200)
            return Response(
                200, _dumps({"counted": counted, "refused": len(results) - counted, "results": results})
            )
        outcome, message = self._label_one(doc)
        code = HTTP_CODE[outcome]
        if code != 200:
            self.metrics.observe(path, code, error=f"feedback_{outcome.value}")
            return Response(code, _dumps({"error": message, "outcome": outcome.value}))
        self.metrics.observe(path, 200)
        return Response(200, _dumps({"id": _id_of(doc), "outcome": outcome.value}))

    def _label_one(self, item: Any) -> tuple[Outcome, str]:
        """Count one ``{"id", "label"}``; return its outcome and, when refused, the one-line reason."""
        if not isinstance(item, dict) or set(item) != {"id", "label"}:
            got = sorted(item)[:4] if isinstance(item, dict) else type(item).__name__
            return Outcome.BAD_LABEL, f'send {{"id": "<id from /v1/predict>", "label": "<label>"}}, got {got}'
        pid, label = item["id"], item["label"]
        if not isinstance(pid, str) or not 1 <= len(pid) <= FEEDBACK_ID_MAX_CHARS:
            self.feedback.count(Outcome.UNKNOWN)
            return Outcome.UNKNOWN, f"id {str(pid)[:70]!r} is not a prediction id of this agent"
        if isinstance(label, int) and not isinstance(label, bool):
            label = str(label)
        labels = self.agent.labels
        if not isinstance(label, str) or label not in labels:
            self.feedback.count(Outcome.BAD_LABEL)
            self.server.trouble.note("feedback_bad_label", f"refused feedback label {str(label)[:40]!r}")
            shown = ", ".join(labels[:12]) + (f", ... ({len(labels)} in all)" if len(labels) > 12 else "")
            return Outcome.BAD_LABEL, f"label {str(label)[:40]!r} is not one of the model's labels: {shown}"
        refused, issued = self.feedback.claim(pid, self.agent.model.ref.sha256)
        if refused is None and issued is not None:
            try:
                right = self.agent.record_label(label, issued.predicted, issued.model_sha256)
            except ValueError:  # the model switched to one without this label meanwhile
                right = None
            if right is not None:
                outcome = Outcome.CORRECT if right else Outcome.INCORRECT
                self.feedback.count(outcome)
                self._labelled(pid, label)
                return outcome, ""
            self.feedback.release(pid)
            self.feedback.count(Outcome.MODEL_CHANGED)
            refused = Outcome.MODEL_CHANGED
        assert refused is not None
        self.server.trouble.note(
            f"feedback_{refused.value}", f"refused feedback: {refused.value} ({pid[:24]})"
        )
        return refused, _FEEDBACK_REASONS[refused].format(
            id=pid[:FEEDBACK_ID_MAX_CHARS], max=self.feedback.max_ids
        )

    def _labelled(self, pid: str, label: str) -> None:
        """Hand a counted label to ``Agent.on_label`` (capture); a failure there is logged, not raised."""
        hook = self.agent.on_label
        if hook is None:
            return
        try:
            hook(pid, label, self.agent.labels.index(label))
        except Exception:  # noqa: BLE001 - capture must never break feedback
            log.exception("on_label hook failed")

    def start(self) -> threading.Thread:
        """Serve in daemon threads (the I/O thread and the workers); return the I/O thread."""
        self._serving = True
        return self.server.start()

    def shutdown(self) -> None:
        self.server.stop()
        if self.listen.startswith("unix:"):
            try:
                os.unlink(self.listen[5:])
            except OSError:
                pass


__all__ = ["ApiServer", "Metrics"]
