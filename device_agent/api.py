"""The local HTTP API: predict, health and Prometheus metrics, on a bounded server (stdlib + numpy).

``POST /v1/predict`` with ``{"inputs": [...]}`` (one sample or a batch), an ``application/x-npy``
body, or raw tensor bytes (``application/octet-stream`` with ``X-Shape`` and ``X-Dtype`` headers) ->
``{"outputs", "labels", "scores", "model"}``; ``GET /v1/health``; ``GET /metrics`` (Prometheus text
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
"""

from __future__ import annotations

import email.utils
import hmac
import io
import json
import logging
import os
import queue
import re
import selectors
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.agent import Agent
from device_agent.config import ApiSettings, read_token
from device_agent.errors import AgentError
from device_agent.formats.strict import check_keys
from device_agent.inference import InputError

_orjson: Any
try:  # optional: a faster JSON parser (pip install orjson); the stdlib's json is the fallback
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the install
    _orjson = None

log = logging.getLogger(__name__)

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
PREFIX = "edgefleet_agent"
MAX_HEADER_BYTES = 16 * 1024
RECV_BYTES = 256 * 1024
TICK_S = 0.25  # how often timeouts are checked
ACCEPT_BATCH = 128
FILES_RESERVED = 128  # descriptors kept for the model, the outbox, MQTT and logs
EVICT_MIN_IDLE_S = 0.1
LINGER_S = 0.002  # a worker waits this long for the next request on its keep-alive connection ...
LINGER_MAX_S = 0.05  # ... and at most this long for one request to arrive completely  # a connection this quiet may be closed for a new one (a fresh one may not have sent yet)  # connections accepted per wake-up of the I/O thread
QUEUE_PER_WORKER = 16  # complete requests waiting per worker; beyond, 503
JSON_BYTES_PER_VALUE = 32  # "-1.2345678901234567e-05, " and then some: what one number costs in JSON
BODY_SLACK_BYTES = 4096  # the JSON object around the numbers, the .npy header
LOG_EVERY_S = 10.0  # one line per kind of client trouble at most this often (with the count)
RAW_DTYPES = ("float32", "float64", "float16", "uint8", "int8", "int16", "int32")
_JSON_HEAD = re.compile(rb'\A\s*\{\s*"inputs"\s*:\s*')
_NUMBER_CHARS = b"0123456789.eE+- \t\r\n"
_REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


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


def _esc(s: str) -> str:
    return str(s).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _dumps(doc: Any) -> bytes:
    if _orjson is not None:
        return bytes(_orjson.dumps(doc)) + b"\n"
    return (json.dumps(doc, separators=(",", ":")) + "\n").encode()


def _loads(raw: bytes) -> Any:
    return _orjson.loads(raw) if _orjson is not None else json.loads(raw)


class BadBody(ValueError):
    """A request body that cannot be decoded; ``kind`` is the schema-violation kind it counts as."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def json_depth(raw: bytes) -> int:
    """Return the deepest nesting of ``[``/``{`` in ``raw`` (brackets inside strings count too: an
    over-estimate, which only matters for bodies the API refuses anyway)."""
    a = np.frombuffer(raw, dtype=np.uint8)
    step = (a == 0x5B).view(np.int8) + (a == 0x7B).view(np.int8) - (a == 0x5D).view(np.int8)
    step -= (a == 0x7D).view(np.int8)
    return int(np.cumsum(step, dtype=np.int64).max(initial=0))


def _skeleton(shape: tuple[int, ...]) -> bytes:
    """The brackets and commas of a rectangular JSON array of ``shape`` (numbers left out)."""
    s = b"[" + b"," * (shape[-1] - 1) + b"]" if shape[-1] > 0 else b"[]"
    for n in reversed(shape[:-1]):
        s = b"[" + b",".join([s] * n) + b"]"
    return s


class JsonInputs:
    """Decode ``{"inputs": X}`` bodies, with a fast path for rectangular arrays of plain numbers.

    The fast path checks the body's brackets and commas against those of an array of the model's
    sample shape (or a batch of them), then parses the numbers as one flat list, so the nested lists
    are never built. Anything else (other shapes, ragged lists, strings, NaN) takes the general path,
    which refuses it with the agent's own message.
    """

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self._cache: dict[tuple[int, ...], bytes] = {}

    def _expected(self, shape: tuple[int, ...]) -> bytes:
        sk = self._cache.get(shape)
        if sk is None:
            if len(self._cache) > 8:
                self._cache.clear()
            sk = self._cache[shape] = _skeleton(shape)
        return sk

    def fast(self, raw: bytes, sample_shape: tuple[int, ...]) -> np.ndarray | None:
        """A float32 array for a rectangular all-numbers body of the model's shape, else None."""
        head = _JSON_HEAD.match(raw)
        if head is None or not sample_shape or min(sample_shape) < 1:
            return None
        end = len(raw.rstrip())
        if raw[end - 1 : end] != b"}":
            return None
        mid = raw[head.end() : end - 1]
        # Only brackets and commas are left; anything else (strings, NaN, true, null, objects) makes
        # it differ from the expected skeleton below, and the general path takes the body.
        sk = mid.translate(None, _NUMBER_CHARS)
        depth = len(sk) - len(sk.lstrip(b"["))
        one = self._expected(sample_shape)
        if depth == len(sample_shape):
            shape = sample_shape
            if sk != one:
                return None
        elif depth == len(sample_shape) + 1:
            n, rem = divmod(len(sk) - 1, len(one) + 1)
            if rem or n < 1 or sk != b"[" + b",".join([one] * n) + b"]":
                return None
            shape = (n, *sample_shape)
        else:
            return None
        flat = mid.translate(None, b"[]")
        try:
            values = _loads(b"[" + flat + b"]")
        except ValueError:
            return None  # "1,,2", "--1": the general path says what is wrong
        try:
            arr = np.asarray(values, dtype=np.float32)
        except (TypeError, ValueError, OverflowError):
            return None
        if arr.size != int(np.prod(shape)):
            return None
        return arr.reshape(shape)

    def general(self, raw: bytes) -> Any:
        """Parse any JSON body (depth-limited); return its ``inputs``; BadBody when it is not valid."""
        if raw.count(b"[") + raw.count(b"{") > self.max_depth and json_depth(raw) > self.max_depth:
            raise BadBody("json", f"JSON nested deeper than {self.max_depth} levels ([api] max_json_depth)")
        try:
            doc = json.loads(raw)  # the stdlib: it accepts NaN, which the agent then refuses as "nan"
        except RecursionError:  # pragma: no cover - the depth check above comes first
            raise BadBody("json", f"JSON nested deeper than {self.max_depth} levels") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise BadBody("json", f"bad JSON: {str(e)[:200]}") from None
        if not isinstance(doc, dict) or "inputs" not in doc:
            raise BadBody("json", 'bad JSON: the body must be a JSON object {"inputs": [...]}')
        check_keys(doc, ["inputs"], (), "body", error=_bad_json, unknown=_UNKNOWN_BODY_KEYS)
        return doc["inputs"]


_UNKNOWN_BODY_KEYS = 'bad JSON: unknown key(s) {extra}; the body is {{"inputs": [...]}}'


def _bad_json(message: str) -> BadBody:
    return BadBody("json", message)


def load_npy(raw: bytes) -> np.ndarray:
    """Decode an ``application/x-npy`` body (no pickles); BadBody when it is not a numeric .npy."""
    try:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise BadBody("body", f"bad .npy body: {str(e)[:200]}") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
        raise BadBody("dtype", f"the .npy body holds {getattr(arr, 'dtype', type(arr))}, not numbers")
    return arr


_RAW_HEADERS: dict[tuple[str, str], tuple[tuple[int, ...], np.dtype[Any], int]] = {}


def load_raw(raw: bytes, shape_h: str | None, dtype_h: str | None) -> np.ndarray:
    """Decode raw little-endian tensor bytes with ``X-Shape: 1,96,96,1`` and ``X-Dtype`` (default float32)."""
    if not shape_h:
        raise BadBody("body", "raw tensor bodies need an X-Shape header, e.g. X-Shape: 1,96,96,1")
    key = (shape_h, dtype_h or "float32")
    known = _RAW_HEADERS.get(key)
    if known is None:
        try:
            shape = tuple(int(d) for d in shape_h.replace("x", ",").split(","))
        except ValueError:
            raise BadBody(
                "shape", f"X-Shape {shape_h[:60]!r} must be comma-separated sizes, e.g. 1,96,96,1"
            ) from None
        if not shape or len(shape) > 8 or min(shape) < 1:
            raise BadBody("shape", f"X-Shape {shape_h[:60]!r} must be 1 to 8 sizes of at least 1")
        name = key[1].strip().lower()
        if name not in RAW_DTYPES:
            raise BadBody("dtype", f"X-Dtype {name[:20]!r} is not one of {', '.join(RAW_DTYPES)}")
        dt = np.dtype(name).newbyteorder("<")
        known = (shape, dt, int(np.prod(shape)) * dt.itemsize)
        if len(_RAW_HEADERS) > 64:
            _RAW_HEADERS.clear()
        _RAW_HEADERS[key] = known
    shape, dt, want = known
    if len(raw) != want:
        raise BadBody(
            "shape", f"X-Shape {shape_h[:60]} of {dt.name} needs {want} bytes, the body has {len(raw)}"
        )
    arr = np.frombuffer(raw, dtype=dt).reshape(shape)
    return arr if dt.isnative else arr.astype(dt.newbyteorder("="))


class _Throttled:
    """Count client trouble by kind and log it at most once per LOG_EVERY_S per kind (with the count)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._since: dict[str, int] = {}

    def note(self, kind: str, message: str, level: int = logging.INFO) -> None:
        now = time.monotonic()
        with self._lock:
            self._since[kind] = self._since.get(kind, 0) + 1
            if now - self._last.get(kind, -1e9) < LOG_EVERY_S:
                return
            n = self._since.pop(kind)
            self._last[kind] = now
        more = f" ({n} since the last such line)" if n > 1 else ""
        log.log(level, "http: %s%s", message, more)


@dataclass
class Request:
    """One parsed HTTP request."""

    method: str
    target: str
    version: str
    headers: dict[str, str]
    body: bytes
    keep_alive: bool


@dataclass
class Response:
    """What a handler returns."""

    code: int
    body: bytes
    ctype: str = "application/json"
    close: bool = False
    headers: tuple[tuple[str, str], ...] = ()


class _Conn:
    """One client connection's state (owned by the I/O thread, or by one worker while it is busy)."""

    __slots__ = (
        "sock",
        "peer",
        "buf",
        "head",
        "hlen",
        "need",
        "reserved",
        "started",
        "last",
        "busy",
        "closed",
        "closed_by_peer",
    )

    def __init__(self, sock: socket.socket, peer: str) -> None:
        self.sock = sock
        self.peer = peer
        self.buf = bytearray()
        self.head: tuple[str, str, str, dict[str, str], bool] | None = None
        self.hlen = 0
        self.need = 0
        self.reserved = 0
        self.started: float | None = None  # first byte of the request being received
        self.last = time.monotonic()
        self.busy = False
        self.closed = False
        self.closed_by_peer = False


class _HttpError(Exception):
    def __init__(self, code: int, message: str, reason: str) -> None:
        super().__init__(message)
        self.code = code
        self.reason = reason


def _fit_open_files(max_connections: int) -> int:
    """Raise the soft open-file limit to hold ``max_connections`` (up to the hard limit); return how many fit.

    Running out of descriptors would make accept() fail while the listening socket stays readable.
    """
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        want = max_connections + FILES_RESERVED
        if soft != resource.RLIM_INFINITY and soft < want:
            new = want if hard == resource.RLIM_INFINITY else min(want, hard)
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
    except (ImportError, ValueError, OSError):  # pragma: no cover - not POSIX, or not allowed
        return max_connections
    if soft != resource.RLIM_INFINITY and soft < max_connections + FILES_RESERVED:
        fit = max(8, int(soft) - FILES_RESERVED)
        log.warning(
            "[api] max_connections %d does not fit the open-file limit %d; serving at most %d connections"
            " (raise LimitNOFILE in the service file)",
            max_connections,
            soft,
            fit,
        )
        return fit
    return max_connections


class _Server:
    """The bounded HTTP/1.1 server: one I/O thread (selectors) and a fixed pool of request workers."""

    def __init__(self, api: ApiServer, listen: str, settings: ApiSettings) -> None:
        self.api = api
        self.settings = settings
        self.listen = listen
        self.unix = listen.startswith("unix:")
        if self.unix:
            path = listen[5:]
            if os.path.exists(path) and Path(path).is_socket():
                os.unlink(path)  # a stale socket from a previous run
            lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                lsock.bind(path)
                os.chmod(path, 0o660)
            except OSError:
                lsock.close()
                raise
        else:
            host, _, port = listen.rpartition(":")
            host = host.strip("[]")
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            lsock = socket.socket(family, socket.SOCK_STREAM)
            try:
                lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                lsock.bind((host, int(port)))
            except OSError:
                lsock.close()
                raise
        self.max_connections = _fit_open_files(settings.max_connections)
        lsock.listen(settings.backlog)
        lsock.setblocking(False)
        self.lsock = lsock
        self.server_address = lsock.getsockname()
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(lsock, selectors.EVENT_READ, "listen")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        self.conns: dict[int, _Conn] = {}
        self._returned: deque[tuple[_Conn, bool]] = deque()
        self._work: queue.Queue[tuple[_Conn, Request] | None] = queue.Queue(
            settings.workers * QUEUE_PER_WORKER
        )
        self._budget_lock = threading.Lock()
        self.buffered_bytes = 0
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.trouble = _Throttled()

    # ------------------------------------------------------------------ threads
    def start(self) -> threading.Thread:
        for i in range(self.settings.workers):
            t = threading.Thread(target=self._worker, name=f"http-worker-{i}", daemon=True)
            t.start()
            self._threads.append(t)
        io_thread = threading.Thread(target=self._serve, name="http-api", daemon=True)
        io_thread.start()
        self._threads.append(io_thread)
        return io_thread

    def stop(self) -> None:
        self._stop.set()
        self._wake()
        for _ in range(self.settings.workers):
            try:
                self._work.put_nowait(None)
            except queue.Full:
                break
        for t in self._threads:
            t.join(5)
        for c in list(self.conns.values()):
            self._close(c)
        for s in (self.lsock, self._wake_r, self._wake_w):
            s.close()
        self._sel.close()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass  # a wake-up is pending already (full buffer), or the server is closing

    # ------------------------------------------------------------------ the I/O thread
    def _serve(self) -> None:
        last_sweep = time.monotonic()
        while not self._stop.is_set():
            try:
                events = self._sel.select(TICK_S)
            except OSError:  # pragma: no cover - interrupted
                continue
            try:
                for key, _ in events:
                    if key.data == "listen":
                        self._accept()
                    elif key.data == "wake":
                        try:
                            while self._wake_r.recv(4096):
                                pass
                        except OSError:
                            pass
                    else:
                        self._readable(key.data)
                self._take_back()
                now = time.monotonic()
                if now - last_sweep >= TICK_S:
                    last_sweep = now
                    self._sweep(now)
            except Exception:  # a bug here must not stop the API: log it (rate-limited) and go on
                self.trouble.note("io", "the HTTP I/O loop failed; it goes on", logging.ERROR)
                log.debug("I/O loop failure", exc_info=True)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, addr = self.lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: say so, keep serving the others
                self.trouble.note(
                    "accept", f"cannot accept a connection ({e.strerror or e})", logging.WARNING
                )
                self.api.metrics.observe("other", 503, error="accept")
                return
            sock.setblocking(False)
            if not self.unix:
                # Headers and body go out in one write, but a client's next request should not wait
                # for a delayed ACK either.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            peer = addr[0] if isinstance(addr, tuple) else "unix"
            c = _Conn(sock, peer)
            if len(self.conns) >= self.max_connections and not self._evict_idle():
                self.api.metrics.observe("other", 503, error="connections")
                self.trouble.note(
                    "connections",
                    f"{self.max_connections} connections open ([api] max_connections); refused one",
                    logging.WARNING,
                )
                self._send_now(c, self._error(503, "too many connections; retry later", retry=True))
                sock.close()
                continue
            self.conns[sock.fileno()] = c
            self._sel.register(sock, selectors.EVENT_READ, c)

    def _evict_idle(self) -> bool:
        """Close the connection idle the longest (no request in progress, quiet for EVICT_MIN_IDLE_S);
        False when there is none."""
        now = time.monotonic()
        idle = [
            c
            for c in self.conns.values()
            if not c.busy and c.started is None and now - c.last >= EVICT_MIN_IDLE_S
        ]
        if not idle:
            return False
        self._close(min(idle, key=lambda c: c.last))
        return True

    def _readable(self, c: _Conn) -> None:
        try:
            data = c.sock.recv(RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        now = time.monotonic()
        if not data:
            if c.started is not None:
                self._gone(c, "while sending its request")
            self._close(c)
            return
        c.buf += data
        c.last = now
        if c.started is None:
            c.started = now
        self._advance(c)

    def _advance(self, c: _Conn) -> None:
        """Parse what ``c`` has received; dispatch a complete request to the workers."""
        try:
            req = self._parse(c)
        except _HttpError as e:
            self.api.metrics.observe("other", e.code, error=e.reason)
            self._send_now(c, self._error(e.code, str(e), retry=e.code == 503))
            self._close(c)
            return
        if req is None:
            return
        self._sel.unregister(c.sock)
        c.busy = True
        try:
            self._work.put_nowait((c, req))
        except queue.Full:
            c.busy = False
            self._release(c)
            self.api.metrics.observe("other", 503, error="busy")
            self.trouble.note(
                "busy", "every request worker is busy and the queue is full; sent 503", logging.WARNING
            )
            self._send_now(c, self._error(503, "the agent is busy; retry later", retry=True))
            self._close(c, registered=False)

    def _take_back(self) -> None:
        while self._returned:
            c, close = self._returned.popleft()
            c.busy = False
            if c.closed_by_peer and c.started is not None:
                self._gone(c, "while sending its request")
            if close or c.closed or c.closed_by_peer:
                self._close(c, registered=False)
                continue
            c.last = time.monotonic()
            c.started = c.last if c.buf else None
            self._sel.register(c.sock, selectors.EVENT_READ, c)
            if c.buf:
                self._advance(c)

    def _sweep(self, now: float) -> None:
        s = self.settings
        for c in list(self.conns.values()):
            if c.busy:
                continue
            if c.started is not None and now - c.started > s.request_timeout_s:
                self.api.metrics.observe("other", 408, error="timeout")
                self.trouble.note(
                    "timeout",
                    f"a request from {c.peer} did not arrive within {s.request_timeout_s:g} s; sent 408",
                )
                self._send_now(
                    c, self._error(408, f"the request did not arrive within {s.request_timeout_s:g} s")
                )
                self._close(c)
            elif c.started is None and now - c.last > s.idle_timeout_s:
                self._close(c)

    def _close(self, c: _Conn, registered: bool = True) -> None:
        if c.closed:
            return
        c.closed = True
        self._release(c)
        if registered:
            try:
                self._sel.unregister(c.sock)
            except (KeyError, ValueError):
                pass
        self.conns.pop(c.sock.fileno(), None)
        try:
            c.sock.close()
        except OSError:
            pass

    def _send_now(self, c: _Conn, resp: Response) -> None:
        """Best-effort, non-blocking write of a short error response (the connection closes after it)."""
        try:
            c.sock.send(self._bytes(resp, "HTTP/1.1", keep_alive=False))
        except OSError:
            pass

    def _gone(self, c: _Conn, when: str) -> None:
        self.api.metrics.observe("other", 499, error="client_gone")
        self.trouble.note("client_gone", f"a client ({c.peer}) went away {when}")

    # ------------------------------------------------------------------ parsing
    def _parse(self, c: _Conn) -> Request | None:
        if c.head is None:
            if c.buf[:2] == b"\r\n":  # stray line ends between requests (RFC 9112 2.2)
                del c.buf[: len(c.buf) - len(c.buf.lstrip(b"\r\n"))]
            end = c.buf.find(b"\r\n\r\n", 0, MAX_HEADER_BYTES + 4)
            if end < 0:
                if len(c.buf) > MAX_HEADER_BYTES:
                    raise _HttpError(431, f"request headers larger than {MAX_HEADER_BYTES} bytes", "headers")
                return None
            lines = bytes(c.buf[:end]).decode("latin-1").split("\r\n")
            parts = lines[0].split(" ")
            if len(parts) != 3 or parts[2] not in ("HTTP/1.1", "HTTP/1.0"):
                raise _HttpError(400, f"bad request line {lines[0][:80]!r}", "request")
            method, target, version = parts
            headers: dict[str, str] = {}
            for line in lines[1:]:
                name, sep, value = line.partition(":")
                if not sep or not name or name != name.strip():
                    raise _HttpError(400, f"bad header line {line[:80]!r}", "request")
                headers[name.lower()] = value.strip()
            if "transfer-encoding" in headers:
                raise _HttpError(
                    411, "chunked bodies are not supported; send a Content-Length header", "length"
                )
            cl = headers.get("content-length")
            if cl is None:
                if method == "POST":
                    raise _HttpError(411, "send a Content-Length header with the body", "length")
                length = 0
            elif not cl.isdigit():
                raise _HttpError(400, f"bad Content-Length {cl[:40]!r}", "length")
            else:
                length = int(cl)
            limit = self.api.body_limit()
            if length > limit:
                raise _HttpError(
                    413,
                    f"request body of {length} bytes exceeds {limit} (room for {self.settings.max_batch} samples"
                    " of this model's input, at most [api] max_body_bytes); send smaller batches or binary bodies",
                    "too_large",
                )
            if length:
                with self._budget_lock:
                    if self.buffered_bytes + length > self.settings.buffer_bytes:
                        raise _HttpError(503, "too many request bodies in flight; retry later", "buffer")
                    self.buffered_bytes += length
                    c.reserved = length
            conn_h = headers.get("connection", "").lower()
            keep = "close" not in conn_h if version == "HTTP/1.1" else "keep-alive" in conn_h
            c.head = (method, target, version, headers, keep)
            c.hlen = end + 4
            c.need = end + 4 + length
            if len(c.buf) < c.need and headers.get("expect", "").lower() == "100-continue":
                try:
                    c.sock.send(b"HTTP/1.1 100 Continue\r\n\r\n")
                except OSError:
                    pass
        if len(c.buf) < c.need:
            return None
        method, target, version, headers, keep = c.head
        body = bytes(c.buf[c.hlen : c.need])
        del c.buf[: c.need]
        c.head = None
        return Request(method, target, version, headers, body, keep)

    def _release(self, c: _Conn) -> None:
        if c.reserved:
            with self._budget_lock:
                self.buffered_bytes -= c.reserved
            c.reserved = 0

    # ------------------------------------------------------------------ workers
    def _worker(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            c, req = item
            close = True
            try:
                close = self._run(c, req)
            except (
                Exception
            ):  # pragma: no cover - the handler catches what it can; this must not kill the pool
                log.exception("http worker failed")
            self._returned.append((c, close))
            self._wake()

    def _run(self, c: _Conn, first: Request) -> bool:
        """Answer ``first`` and requests already buffered behind it; return True to close the connection."""
        req: Request | None = first
        c.sock.settimeout(LINGER_S if LINGER_S > 0 else self.settings.request_timeout_s)
        try:
            while req is not None:
                try:
                    resp = self.api.handle(req)
                except Exception as e:  # the daemon keeps serving whatever one request does
                    log.exception("request failed")
                    resp = self._error(500, f"internal error: {type(e).__name__}")
                finally:
                    self._release(c)
                keep = req.keep_alive and not resp.close
                try:
                    self._send_all(c, self._bytes(resp, req.version, keep))
                except OSError:
                    self._gone(c, "before its answer was sent")
                    return True
                if not keep or self._stop.is_set():
                    return True
                req = None
                if c.buf:  # pipelined: answer in order without a trip through the I/O thread
                    c.started = time.monotonic()
                    try:
                        req = self._parse(c)
                    except _HttpError:
                        return False  # the I/O thread parses it again and answers the error
                if req is None:
                    req = self._linger(c)
            return False
        finally:
            try:
                c.sock.setblocking(False)
            except OSError:
                pass

    def _send_all(self, c: _Conn, data: bytes) -> None:
        """Write a response: one send within the worker's short timeout, the rest (a slow reader)
        within request_timeout_s."""
        try:
            sent = c.sock.send(data)
        except TimeoutError:
            sent = 0
        if sent < len(data):
            c.sock.settimeout(self.settings.request_timeout_s)
            try:
                c.sock.sendall(data[sent:])
            finally:
                c.sock.settimeout(LINGER_S if LINGER_S > 0 else self.settings.request_timeout_s)

    def _linger(self, c: _Conn) -> Request | None:
        """Wait up to LINGER_S for the next request on ``c`` while no other request waits for a worker.

        A client on a keep-alive connection usually sends its next request within a fraction of a
        millisecond; taking it here saves the trip through the I/O thread (two thread wake-ups). A
        request that is not complete within LINGER_MAX_S goes back to the I/O thread, so a slow
        client holds a worker for no longer than that.
        """
        if LINGER_S <= 0:
            return None
        deadline = time.monotonic() + LINGER_MAX_S
        while self._work.empty() and not self._stop.is_set() and time.monotonic() < deadline:
            try:
                data = c.sock.recv(RECV_BYTES)  # the socket's timeout is LINGER_S while a worker has it
            except (TimeoutError, BlockingIOError, InterruptedError):
                return None
            except OSError:
                data = b""
            if not data:
                c.closed_by_peer = True
                return None
            c.buf += data
            c.last = time.monotonic()
            if c.started is None:
                c.started = c.last
            try:
                req = self._parse(c)
            except _HttpError:
                return None  # the I/O thread parses it again and answers the error
            if req is not None:
                return req
        return None

    # ------------------------------------------------------------------ responses
    _date = ("", 0.0)

    def _bytes(self, resp: Response, version: str, keep_alive: bool) -> bytes:
        now = time.time()
        if now - self._date[1] >= 1.0:
            _Server._date = (email.utils.formatdate(now, usegmt=True), now)
        head = (
            f"HTTP/1.1 {resp.code} {_REASONS.get(resp.code, 'Error')}\r\nServer: edgefleet-agent\r\n"
            f"Date: {self._date[0]}\r\nContent-Type: {resp.ctype}\r\nContent-Length: {len(resp.body)}\r\n"
        )
        for k, v in resp.headers:
            head += f"{k}: {v}\r\n"
        if not keep_alive:
            head += "Connection: close\r\n"
        elif version == "HTTP/1.0":
            head += "Connection: keep-alive\r\n"
        return head.encode("latin-1") + b"\r\n" + resp.body

    @staticmethod
    def _error(code: int, message: str, retry: bool = False) -> Response:
        headers = (("Retry-After", "1"),) if retry else ()
        return Response(
            code,
            _dumps({"error": message}),
            close=code >= 500 or code in (408, 411, 413, 431),
            headers=headers,
        )


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
        self.server = _Server(self, listen, self.settings)
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
            if path != "/v1/predict":
                return self._fail(
                    404, f"no such endpoint {path[:100]!r}; POST to /v1/predict", "not_found", "other"
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
        try:
            pred = agent.predict(x)
        except InputError as e:
            log.warning("refused input (%s): %s", e.kind, e)
            return self._fail(400, str(e), e.kind, path)
        except AgentError as e:
            return self._fail(500, str(e), "model", path)
        except Exception as e:  # the daemon keeps serving whatever one request does
            log.exception("predict failed")
            return self._fail(500, f"internal error: {type(e).__name__}", "internal", path)
        # pred.to_dict(), with the score matrix converted in one call (the same Python floats)
        payload = _dumps(
            {
                "outputs": np.asarray(pred.outputs).tolist(),
                "labels": pred.labels,
                "scores": pred.scores,
                "model": pred.model.to_dict(),
            }
        )
        self.metrics.observe(path, 200, seconds=time.perf_counter() - t0)
        return Response(200, payload)

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
