"""The local HTTP API (stdlib only): predict, health and Prometheus metrics.

``POST /v1/predict`` ``{"inputs": [...]}`` (one sample or a batch) -> ``{"outputs", "labels",
"scores", "model"}``; ``GET /v1/health``; ``GET /metrics`` (Prometheus text format 0.0.4).
Listens on ``HOST:PORT`` (127.0.0.1 by default) or a Unix socket (``unix:/path``). Bad JSON or an
input that does not fit the model is a 400 with a one-line error, counted as a schema violation.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from device_agent.agent import Agent
from device_agent.errors import AgentError
from device_agent.inference import InputError

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024 * 1024
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
PREFIX = "edgefleet_agent"


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


def _esc(s: str) -> str:
    return str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Handler(BaseHTTPRequestHandler):
    server_version = "edgefleet-agent"
    protocol_version = "HTTP/1.1"
    api: ApiServer

    def setup(self) -> None:
        super().setup()
        if isinstance(self.client_address, tuple):
            # Headers and body go out in two writes: without TCP_NODELAY, Nagle's algorithm and the
            # client's delayed ACK add about 40 ms to every keep-alive request.
            self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        log.debug("http: " + format, *args)

    def address_string(self) -> str:
        return self.client_address[0] if isinstance(self.client_address, tuple) else "unix"

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, code: int, doc: Any) -> None:
        self._send(code, (json.dumps(doc, separators=(",", ":")) + "\n").encode())

    def _error(self, code: int, message: str, reason: str, path: str) -> None:
        self.api.metrics.observe(path, code, error=reason)
        self._json(code, {"error": message})

    def do_GET(self) -> None:  # noqa: N802 - stdlib naming
        path = self.path.split("?", 1)[0]
        if path == "/v1/health":
            self.api.metrics.observe(path, 200)
            self._json(200, self.api.health())
        elif path == "/metrics":
            self.api.metrics.observe(path, 200)
            self._send(200, self.api.metrics_text().encode(), "text/plain; version=0.0.4; charset=utf-8")
        elif path == "/v1/predict":
            self._error(405, 'use POST /v1/predict with a JSON body {"inputs": [...]}', "method", path)
        else:
            self._error(
                404,
                f"no such endpoint {path[:100]!r}; try /v1/predict, /v1/health or /metrics",
                "not_found",
                "other",
            )

    def do_POST(self) -> None:  # noqa: N802
        path = self.path.split("?", 1)[0]
        if path != "/v1/predict":
            self._error(404, f"no such endpoint {path[:100]!r}; POST to /v1/predict", "not_found", "other")
            return
        t0 = time.perf_counter()
        agent = self.api.agent
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            self.close_connection = True
            self._error(411, "send a Content-Length header with the JSON body", "length", path)
            return
        n = int(length)
        if n > MAX_BODY_BYTES:
            self.close_connection = True
            self._error(
                413,
                f"request body of {n} bytes exceeds {MAX_BODY_BYTES}; send smaller batches",
                "too_large",
                path,
            )
            return
        body = self.rfile.read(n)
        try:
            doc = json.loads(body)
            if not isinstance(doc, dict) or "inputs" not in doc:
                raise ValueError('the body must be a JSON object {"inputs": [...]}')
            extra = set(doc) - {"inputs"}
            if extra:
                raise ValueError(f'unknown key(s) {sorted(extra)[:5]}; the body is {{"inputs": [...]}}')
        except (ValueError, UnicodeDecodeError) as e:
            agent.record_violation("json")
            log.warning("bad /v1/predict body (%s): %r", e, body[:120])
            self._error(400, f"bad JSON: {str(e)[:200]}", "json", path)
            return
        try:
            pred = agent.predict(doc["inputs"])
        except InputError as e:
            log.warning("refused input (%s): %s", e.kind, e)
            self._error(400, str(e), e.kind, path)
            return
        except AgentError as e:
            self._error(500, str(e), "model", path)
            return
        except Exception as e:  # the daemon keeps serving whatever one request does
            log.exception("predict failed")
            self._error(500, f"internal error: {type(e).__name__}", "internal", path)
            return
        payload = (json.dumps(pred.to_dict(), separators=(",", ":")) + "\n").encode()
        self.api.metrics.observe(path, 200, seconds=time.perf_counter() - t0)
        self._send(200, payload)


class _UnixHTTPServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True

    def server_bind(self) -> None:
        path = str(self.server_address)
        if os.path.exists(path) and Path(path).is_socket():
            os.unlink(path)  # a stale socket from a previous run
        socketserver.UnixStreamServer.server_bind(self)
        os.chmod(path, 0o660)


class ApiServer:
    """Serve the API for an Agent on ``listen`` (``HOST:PORT`` or ``unix:/path``)."""

    def __init__(
        self,
        agent: Agent,
        listen: str,
        health: Callable[[], dict[str, Any]] | None = None,
        gauges: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        self.agent = agent
        self.metrics = Metrics()
        self._health = health
        self._gauges = gauges
        handler = type("Handler", (_Handler,), {"api": self})
        self.listen = listen
        if listen.startswith("unix:"):
            self.httpd: Any = _UnixHTTPServer(listen[5:], handler)
        else:
            host, _, port = listen.rpartition(":")
            host = host.strip("[]")
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            server_cls = type("Server", (ThreadingHTTPServer,), {"address_family": family})
            self.httpd = server_cls((host, int(port)), handler)
        self.httpd.daemon_threads = True
        self._serving = False

    @property
    def address(self) -> str:
        """Where it listens (``HOST:PORT`` with the real port, or ``unix:/path``)."""
        if self.listen.startswith("unix:"):
            return self.listen
        host, port = self.httpd.server_address[:2]
        return f"{host}:{port}"

    def health(self) -> dict[str, Any]:
        if self._health is not None:
            return self._health()
        m = self.agent.model
        return {"status": "ok", "model": {**m.ref.to_dict(), "runtime": m.runtime}}

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
        return self.metrics.render(gauges, {**m.ref.to_dict(), "runtime": m.runtime})

    def start(self) -> threading.Thread:
        """Serve in a daemon thread; return it."""
        self._serving = True
        t = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2}, name="http-api", daemon=True
        )
        t.start()
        return t

    def shutdown(self) -> None:
        if self._serving:  # shutdown() waits for serve_forever, which may never have started
            self.httpd.shutdown()
        self.httpd.server_close()
        if self.listen.startswith("unix:"):
            try:
                os.unlink(self.listen[5:])
            except OSError:
                pass
