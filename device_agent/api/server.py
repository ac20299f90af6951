"""The bounded HTTP/1.1 server under the local API: one non-blocking I/O thread, a fixed worker pool.

The I/O thread accepts and reads every connection without blocking and hands only complete requests
to the workers (``QUEUE_PER_WORKER`` each, else 503), so idle, slow or half-sent requests hold no
thread. Timeouts, header and body limits, the buffer budget and the connection cap live here; what a
request means is ``ApiServer.handle`` (``device_agent.api``). One cohesive thing: the connection state
machine and the worker hand-off share every field, so it stays one module.
"""

from __future__ import annotations

import email.utils
import logging
import os
import queue
import selectors
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from device_agent.api.bodies import _dumps
from device_agent.config import ApiSettings

if TYPE_CHECKING:
    from device_agent.api import ApiServer

log = logging.getLogger(__name__)

MAX_HEADER_BYTES = 16 * 1024
RECV_BYTES = 256 * 1024
TICK_S = 0.25  # how often timeouts are checked
ACCEPT_BATCH = 128  # connections accepted per wake-up of the I/O thread
FILES_RESERVED = 128  # descriptors kept for the model, the outbox, MQTT and logs
EVICT_MIN_IDLE_S = (
    0.1  # a connection this quiet may be closed for a new one (a fresh one may not have sent yet)
)
LINGER_S = 0.002  # a worker waits this long for the next request on its keep-alive connection ...
LINGER_MAX_S = 0.05  # ... and at most this long for one request to arrive completely
QUEUE_PER_WORKER = 16  # complete requests waiting per worker; beyond, 503
LOG_EVERY_S = 10.0  # one line per kind of client trouble at most this often (with the count)

_REASONS = {
    100: "Continue",
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    408: "Request Timeout",
    411: "Length Required",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


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


class HttpServer:
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
        with memoryview(c.buf) as view:  # one copy of the body (a bytearray slice would be two)
            body = bytes(view[c.hlen : c.need])
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
            HttpServer._date = (email.utils.formatdate(now, usegmt=True), now)
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
