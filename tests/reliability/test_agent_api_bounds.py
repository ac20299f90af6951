"""Finding 5: the agent's HTTP API is bounded, and fast with binary bodies.

Real sockets against the real server and real models (ONNX Runtime, and LiteRT int8 on the native
path). Before: 2,000 half-sent requests held 2,009 threads, bodies of 16 MiB were read whatever the
model, a body nested 5,000 deep raised RecursionError and closed the connection without a 400, the
listen backlog was 5, and every aborted connection logged a traceback.
"""

from __future__ import annotations

import http.client as httpclient
import io
import json
import logging
import os
import re
import resource
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.api import ApiServer
from device_agent.api.bodies import JsonInputs, json_depth
from device_agent.config import ApiSettings, parse_config
from device_agent.errors import ConfigError
from tests.device_agent.agent_bundles import cached_onnx_bundle, cached_tflite_image_bundle

TIMEOUT_S = 10.0  # every client socket: a request that is starved fails the test instead of hanging it


def serve(bundle: Path, **settings: Any) -> ApiServer:
    srv = ApiServer(Agent(bundle), "127.0.0.1:0", settings=ApiSettings(**settings))
    srv.start()
    return srv


@pytest.fixture
def onnx_server() -> Iterator[ApiServer]:
    srv = serve(cached_onnx_bundle(), workers=2)
    yield srv
    srv.shutdown()


def conn(srv: ApiServer) -> httpclient.HTTPConnection:
    host, port = srv.address.rsplit(":", 1)
    return httpclient.HTTPConnection(host, int(port), timeout=TIMEOUT_S)


def call(
    c: httpclient.HTTPConnection, method: str, path: str, body: bytes | None = None, headers: Any = None
) -> tuple[int, Any, dict[str, str]]:
    c.request(method, path, body, headers or {})
    r = c.getresponse()
    raw = r.read()
    try:
        doc: Any = json.loads(raw)
    except ValueError:
        doc = raw.decode()
    return r.status, doc, {k.lower(): v for k, v in r.getheaders()}


def metric(srv: ApiServer, name: str) -> float:
    for line in srv.metrics_text().splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def sample_shape(srv: ApiServer) -> tuple[int, ...]:
    return tuple(srv.agent.model.predictor.sample_shape)


def unlike_ours(shape: tuple[int, ...], n: int, seed: int = 0) -> np.ndarray:
    """Inputs unlike the digits (0..16 integers): [0, 1) floats with a few negatives and large values."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, *shape), dtype=np.float32)
    x.reshape(n, -1)[:, ::7] *= -3.5
    x.reshape(n, -1)[:, 1::11] *= 4000.0
    return x


@pytest.fixture(scope="module", autouse=True)
def _many_files() -> Iterator[None]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = min(hard, 8192)
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# ------------------------------------------------------------------------------------------ starvation


@pytest.mark.timeout(180)
def test_600_half_sent_requests_hold_no_thread_and_do_not_starve_others() -> None:
    srv = serve(cached_onnx_bundle(), workers=4, request_timeout_s=60.0)
    held: list[socket.socket] = []
    try:
        host, port = srv.address.rsplit(":", 1)
        before = threading.active_count()
        for i in range(600):
            s = socket.create_connection((host, int(port)), timeout=TIMEOUT_S)
            if i % 2:  # half of them send part of a request, the others nothing at all
                s.sendall(b'POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n{"inputs": [')
            held.append(s)
        # every connection is accepted (the I/O thread reads them all), yet no thread is added
        deadline = time.monotonic() + 30
        while (len(srv.server.conns) < 600 or srv.server.buffered_bytes < 300 * 5000) and (
            time.monotonic() < deadline
        ):
            time.sleep(0.05)
        assert len(srv.server.conns) == 600
        assert threading.active_count() == before  # the pool was started with the server
        assert srv.server.buffered_bytes == 300 * 5000  # reserved for the half-sent bodies, bounded
        c = conn(srv)
        code, h, _ = call(c, "GET", "/v1/health")
        assert code == 200 and h["api"]["connections"] >= 601
        x = unlike_ours(sample_shape(srv), 20, seed=1)
        want = srv.agent.predict(x).labels
        for i in range(20):  # real predictions, one at a time on a keep-alive connection
            code, out, _ = call(c, "POST", "/v1/predict", json.dumps({"inputs": x[i].tolist()}).encode())
            assert code == 200 and out["labels"] == [want[i]]
        c.close()
        assert threading.active_count() == before
    finally:
        for s in held:
            s.close()
        srv.shutdown()


@pytest.mark.timeout(60)
def test_a_request_that_never_completes_gets_408_and_is_counted(caplog) -> None:
    srv = serve(cached_onnx_bundle(), workers=1, request_timeout_s=0.5)
    try:
        host, port = srv.address.rsplit(":", 1)
        socks = []
        with caplog.at_level(logging.INFO, logger="device_agent.api"):
            for _ in range(5):
                s = socket.create_connection((host, int(port)), timeout=TIMEOUT_S)
                s.sendall(b"POST /v1/predict HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
                socks.append(s)
            for s in socks:
                data = s.recv(4096)
                assert data.startswith(b"HTTP/1.1 408 "), data
                assert s.recv(4096) == b""  # and closed
                s.close()
        assert 'reason="timeout"} 5' in srv.metrics_text()
        lines = [r for r in caplog.records if "did not arrive" in r.getMessage()]
        assert 1 <= len(lines) <= 2  # one line (rate-limited), with the count
        assert srv.server.buffered_bytes == 0
    finally:
        srv.shutdown()


@pytest.mark.timeout(60)
def test_clients_that_go_away_are_one_counted_line_without_traceback(onnx_server, caplog) -> None:
    srv = onnx_server
    host, port = srv.address.rsplit(":", 1)
    with caplog.at_level(logging.DEBUG):
        for i in range(50):
            s = socket.create_connection((host, int(port)), timeout=TIMEOUT_S)
            s.sendall(b'POST /v1/predict HTTP/1.1\r\nContent-Length: 1000\r\n\r\n{"inp')
            if i % 2:  # an abort (RST) or an orderly close (FIN)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            s.close()
        deadline = time.monotonic() + TIMEOUT_S
        while 'reason="client_gone"} 50' not in srv.metrics_text() and time.monotonic() < deadline:
            time.sleep(0.05)
    assert 'edgefleet_agent_http_errors_total{reason="client_gone"} 50' in srv.metrics_text()
    gone = [r for r in caplog.records if "went away" in r.getMessage()]
    assert len(gone) == 1
    assert not any(r.exc_info for r in caplog.records)
    assert "Traceback" not in caplog.text
    assert srv.server.buffered_bytes == 0
    c = conn(srv)
    assert call(c, "GET", "/v1/health")[0] == 200


# ------------------------------------------------------------------------------------------ limits


@pytest.mark.timeout(60)
def test_json_nested_5000_deep_is_a_400_on_a_connection_that_stays_usable(onnx_server) -> None:
    srv = onnx_server
    c = conn(srv)
    body = b'{"inputs": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    code, out, _ = call(c, "POST", "/v1/predict", body)
    assert code == 400 and "nested deeper than 32" in out["error"]
    assert "\n" not in out["error"]
    assert srv.agent.close_window().profile.schema_violations == {"json": 1}
    assert call(c, "GET", "/v1/health")[0] == 200  # the same keep-alive connection


def test_json_depth_counts_brackets() -> None:
    assert json_depth(b'{"inputs": [[1, 2], [3]]}') == 3
    assert json_depth(b"[]") == 1 and json_depth(b"1") == 0
    assert json_depth(b"[" * 5000 + b"]" * 5000) == 5000


@pytest.mark.timeout(60)
def test_body_limit_is_sized_from_the_model_input_and_capped(onnx_server) -> None:
    srv = onnx_server
    n = int(np.prod(sample_shape(srv)))
    limit = 4096 + 256 * n * 32  # max_batch samples of JSON numbers, plus the object around them
    assert srv.body_limit() == limit < 16 * 1024 * 1024
    s = socket.create_connection(srv.address.rsplit(":", 1), timeout=TIMEOUT_S)  # type: ignore[arg-type]
    s.sendall(f"POST /v1/predict HTTP/1.1\r\nContent-Length: {limit + 1}\r\n\r\n".encode())
    data = s.recv(4096)
    assert data.startswith(b"HTTP/1.1 413 ") and f"exceeds {limit}".encode() in data
    s.close()
    capped = serve(cached_onnx_bundle(), max_body_bytes=50_000)
    try:
        assert capped.body_limit() == 50_000
        c = conn(capped)
        code, out, _ = call(capped_c := c, "POST", "/v1/predict", b"x" * 50_001)
        assert code == 413 and "exceeds 50000" in out["error"]
        capped_c.close()
    finally:
        capped.shutdown()


@pytest.mark.timeout(60)
def test_bodies_in_flight_are_bounded_by_buffer_bytes() -> None:
    srv = serve(cached_onnx_bundle(), buffer_bytes=1 << 20)
    try:
        host, port = srv.address.rsplit(":", 1)
        size = srv.body_limit()
        socks = []
        answers = []
        for _ in range((1 << 20) // size + 2):
            s = socket.create_connection((host, int(port)), timeout=TIMEOUT_S)
            s.sendall(f"POST /v1/predict HTTP/1.1\r\nContent-Length: {size}\r\n\r\n".encode())
            socks.append(s)
        time.sleep(0.5)  # the server answers refusals at once; the others wait for their bodies
        for s in socks:
            s.setblocking(False)
            try:
                answers.append(s.recv(4096))
            except BlockingIOError:
                answers.append(b"")
        refused = [a for a in answers if a.startswith(b"HTTP/1.1 503 ")]
        assert len(refused) == len(socks) - (1 << 20) // size
        assert all(b"Retry-After: 1" in a for a in refused)
        assert srv.server.buffered_bytes <= 1 << 20
        for s in socks:
            s.close()
    finally:
        srv.shutdown()


@pytest.mark.timeout(60)
def test_listen_backlog_is_at_least_64(onnx_server) -> None:
    port = onnx_server.address.rsplit(":", 1)[1]
    out = subprocess.run(
        ["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True, timeout=10
    ).stdout
    # for a listening socket, ss shows the backlog as Send-Q
    send_q = int(out.split()[2])
    assert send_q >= 64, out


@pytest.mark.timeout(60)
def test_max_connections_evicts_idle_ones_first_then_refuses() -> None:
    srv = serve(cached_onnx_bundle(), max_connections=8)
    try:
        host, port = srv.address.rsplit(":", 1)
        idle = [socket.create_connection((host, int(port)), timeout=TIMEOUT_S) for _ in range(8)]
        time.sleep(0.3)
        c = conn(srv)  # the ninth: the oldest idle connection makes room
        assert call(c, "GET", "/v1/health")[0] == 200
        assert idle[0].recv(10) == b""  # closed by the server
        time.sleep(0.3)  # c is idle now too
        busy = []
        for _ in range(8):
            s = socket.create_connection((host, int(port)), timeout=TIMEOUT_S)
            s.sendall(b"POST /v1/predict HTTP/1.1\r\nContent-Length: 10\r\n\r\n{")
            busy.append(s)
        time.sleep(0.3)
        extra = socket.create_connection((host, int(port)), timeout=TIMEOUT_S)
        assert extra.recv(4096).startswith(b"HTTP/1.1 503 ")
        for s in idle + busy + [extra]:
            s.close()
        c.close()
    finally:
        srv.shutdown()


# ------------------------------------------------------------------------------------------ auth


@pytest.mark.timeout(60)
def test_bearer_token(tmp_path: Path) -> None:
    tok = tmp_path / "api.token"
    tok.write_text("s3cr3t-token-0123456789\n")
    tok.chmod(0o600)
    srv = serve(cached_onnx_bundle(), token_file=tok)
    try:
        c = conn(srv)
        code, out, headers = call(c, "GET", "/v1/health")
        assert code == 401 and "Bearer" in out["error"] and headers["www-authenticate"].startswith("Bearer")
        assert call(c, "GET", "/metrics", headers={"Authorization": "Bearer wrong"})[0] == 401
        x = unlike_ours(sample_shape(srv), 1)[0]
        body = json.dumps({"inputs": x.tolist()}).encode()
        assert call(c, "POST", "/v1/predict", body)[0] == 401
        ok = {"Authorization": "Bearer s3cr3t-token-0123456789"}
        assert call(c, "GET", "/v1/health", headers=ok)[0] == 200
        assert call(c, "POST", "/v1/predict", body, ok)[0] == 200
        assert 'reason="auth"} 3' in call(c, "GET", "/metrics", headers=ok)[1]
        assert srv.agent.predictions_total == 1
    finally:
        srv.shutdown()


def api_config(tmp_path: Path, api: str) -> dict[str, Any]:
    import tomllib

    text = f'[agent]\ndevice_id = "d1"\nfleet = "f"\nbundle = "b"\nstate_dir = "s"\n[api]\n{api}\n'
    return tomllib.loads(text)


@pytest.mark.parametrize(
    ("api", "msg"),
    [
        ("workers = 0", "[api] workers must be between 1 and 64"),
        ("backlog = 5", "[api] backlog must be between 64"),
        ("request_timeout_s = 0", "[api] request_timeout_s must be between 0.1"),
        ("max_body_bytes = 10", "[api] max_body_bytes must be between 1024"),
        ("max_json_depth = 1", "[api] max_json_depth must be between 2"),
        ("workers = true", "[api] workers must be an integer"),
        ("workers = 2.5", "[api] workers must be an integer"),
        ("max_batch = 0", "[api] max_batch must be between 1"),
        ("threads = 4", "unknown key(s) threads in [api]"),
    ],
)
def test_api_config_is_strict(tmp_path: Path, api: str, msg: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(api_config(tmp_path, api), tmp_path)
    assert msg in str(e.value)


def test_api_config_values_and_token_file_checks(tmp_path: Path) -> None:
    from device_agent.config import read_token

    cfg = parse_config(
        api_config(tmp_path, 'workers = 8\nrequest_timeout_s = 2\ntoken_file = "tok"\nmax_batch = 32'),
        tmp_path,
    )
    assert cfg.api.workers == 8 and cfg.api.request_timeout_s == 2.0 and cfg.api.max_batch == 32
    assert cfg.api.token_file == tmp_path / "tok" and cfg.api.backlog >= 64
    tok = tmp_path / "tok"
    with pytest.raises(ConfigError, match="cannot be read"):
        read_token(tok)
    tok.write_text("short\n")
    tok.chmod(0o600)
    with pytest.raises(ConfigError, match="at least 16"):
        read_token(tok)
    tok.write_text("a-long-enough-token-value\n")
    tok.chmod(0o644)
    with pytest.raises(ConfigError, match="chmod 600"):
        read_token(tok)
    tok.chmod(0o640)
    assert read_token(tok) == "a-long-enough-token-value"


@pytest.mark.timeout(120)
def test_bad_api_config_exits_78(tmp_path: Path) -> None:
    import sys

    from tests.helpers import REPO

    cfg = tmp_path / "agent.toml"
    cfg.write_text(
        f'[agent]\ndevice_id = "d1"\nfleet = "f"\nbundle = "{cached_onnx_bundle()}"\nstate_dir = "{tmp_path / "s"}"\n'
        'allow_unsigned = true\n[api]\nlisten = "127.0.0.1:0"\nworkers = 500\n'
    )
    r = subprocess.run(
        [sys.executable, "-m", "device_agent.cli", "run", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
    )
    assert r.returncode == 78
    assert "[api] workers must be between 1 and 64" in r.stderr and "Traceback" not in r.stderr


# ------------------------------------------------------------------------------------------ binary bodies


@pytest.fixture(scope="module", params=["onnx", "litert-int8"])
def model_server(request: pytest.FixtureRequest) -> Iterator[ApiServer]:
    bundle = cached_onnx_bundle() if request.param == "onnx" else cached_tflite_image_bundle()
    srv = serve(bundle, workers=2)
    yield srv
    srv.shutdown()


def npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


@pytest.mark.timeout(120)
def test_json_npy_and_raw_bodies_give_the_same_answers(model_server: ApiServer) -> None:
    srv = model_server
    shape = sample_shape(srv)
    x = unlike_ours(shape, 5, seed=3)
    want = srv.agent.predict(x)
    c = conn(srv)
    bodies = {
        "json batch": (json.dumps({"inputs": x.tolist()}).encode(), {"Content-Type": "application/json"}),
        "json pretty": (json.dumps({"inputs": x.tolist()}, indent=2).encode(), {}),
        "npy float32": (npy(x), {"Content-Type": "application/x-npy"}),
        "npy float64": (npy(x.astype(np.float64)), {"Content-Type": "application/x-npy"}),
        "raw float32": (
            x.tobytes(),
            {"Content-Type": "application/octet-stream", "X-Shape": ",".join(map(str, x.shape))},
        ),
        "raw float64": (
            x.astype("<f8").tobytes(),
            {
                "Content-Type": "application/octet-stream",
                "X-Shape": ",".join(map(str, x.shape)),
                "X-Dtype": "float64",
            },
        ),
    }
    for name, (body, headers) in bodies.items():
        code, out, _ = call(c, "POST", "/v1/predict", body, headers)
        assert code == 200, (name, out)
        assert out["labels"] == want.labels, name
        np.testing.assert_allclose(
            np.asarray(out["outputs"]), want.outputs, rtol=1e-6, atol=1e-7, err_msg=name
        )
    # one sample, each way (the native single-sample path on LiteRT)
    one = srv.agent.predict(x[0])
    for body, headers in (
        (json.dumps({"inputs": x[0].tolist()}).encode(), {}),
        (npy(x[0]), {"Content-Type": "application/x-npy"}),
        (x[0].tobytes(), {"Content-Type": "application/octet-stream", "X-Shape": ",".join(map(str, shape))}),
    ):
        code, out, _ = call(c, "POST", "/v1/predict", body, headers)
        assert code == 200 and out["labels"] == one.labels and out["scores"] == pytest.approx(one.scores)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("ctype", "make", "status", "reason", "msg"),
    [
        ("application/octet-stream", lambda x: (x.tobytes(), {}), 400, "body", "X-Shape"),
        (
            "application/octet-stream",
            lambda x: (x.tobytes()[:-4], {"X-Shape": "SHAPE"}),
            400,
            "shape",
            "needs",
        ),
        (
            "application/octet-stream",
            lambda x: (x.tobytes(), {"X-Shape": "SHAPE", "X-Dtype": "complex64"}),
            400,
            "dtype",
            "X-Dtype",
        ),
        (
            "application/octet-stream",
            lambda x: (x.tobytes(), {"X-Shape": "a,b"}),
            400,
            "shape",
            "comma-separated",
        ),
        ("application/x-npy", lambda x: (b"\x93NUMPY garbage", {}), 400, "body", "bad .npy"),
        ("application/x-npy", lambda x: (npy(np.array(["a", "b"])), {}), 400, "dtype", "not numbers"),
        ("application/x-npy", lambda x: (npy(x.reshape(2, -1)[:, :5]), {}), 400, "shape", "does not fit"),
    ],
)
def test_bad_binary_bodies_are_400_and_counted(onnx_server, ctype, make, status, reason, msg) -> None:
    srv = onnx_server
    shape = sample_shape(srv)
    x = unlike_ours(shape, 2)
    body, headers = make(x)
    headers = {k: v.replace("SHAPE", ",".join(map(str, x.shape))) for k, v in headers.items()}
    code, out, _ = call(conn(srv), "POST", "/v1/predict", body, {"Content-Type": ctype, **headers})
    assert code == status and msg in out["error"], out
    assert srv.agent.close_window().profile.schema_violations == {reason: 1}


@pytest.mark.parametrize(
    ("text", "fast"),
    [
        (b'{"inputs": [[1, 2], [3, 4]]}', True),
        (b'{"inputs":[[1,2],[3,4],[5,6]]}', True),
        (b'\n{ "inputs" :\n [ [ -1e-3 , 2.5E+2 ] ,\n[3,4] ] }\n', True),
        (b'{"inputs": [1, 2]}', True),
        (b'{"inputs": [[1, 2], [3]]}', False),  # ragged
        (b'{"inputs": [[1, 2, 3], [4, 5, 6]]}', False),  # another sample shape
        (b'{"inputs": [[1, NaN], [3, 4]]}', False),
        (b'{"inputs": [[1, "2"], [3, 4]]}', False),
        (b'{"inputs": [[1,,2], [3, 4]]}', False),
        (b'{"inputs": [[1, 2], [3, 4]], "x": 1}', False),
        (b'{"inputs": [[]]}', False),
        (b'{"inputs": [[1e999, 2], [3, 4]]}', False),  # the general path reads inf; the agent refuses it
    ],
)
def test_json_fast_path_takes_only_what_the_general_path_reads_the_same(text: bytes, fast: bool) -> None:
    j = JsonInputs(32)
    got = j.fast(text, (2,))
    assert (got is not None) == fast
    if got is not None:
        ref = np.asarray(json.loads(text)["inputs"], dtype=np.float32)
        np.testing.assert_array_equal(got, ref)
        assert got.dtype == np.float32


def test_json_fast_path_is_used_for_the_model_shape(onnx_server) -> None:
    srv = onnx_server
    shape = sample_shape(srv)
    x = unlike_ours(shape, 3)
    body = json.dumps({"inputs": x.tolist()}).encode()
    got = srv._json.fast(body, shape)
    assert got is not None and got.shape == x.shape
    np.testing.assert_array_equal(got, x)  # float32 -> JSON (repr of the double) -> float32 is exact
    one = srv._json.fast(json.dumps({"inputs": x[0].tolist()}).encode(), shape)
    assert one is not None and one.shape == shape
    assert re.search(rb"\d", body)


def test_json_fast_path_without_orjson(monkeypatch: pytest.MonkeyPatch) -> None:
    """A device without orjson parses with the standard library: same arrays, same answers."""
    from device_agent.api import bodies as api_mod

    x = unlike_ours((3, 2), 4, seed=5)
    body = json.dumps({"inputs": x.tolist()}).encode()
    with_orjson = JsonInputs(32).fast(body, (3, 2))
    monkeypatch.setattr(api_mod, "_orjson", None)
    without = JsonInputs(32).fast(body, (3, 2))
    assert with_orjson is not None and without is not None
    np.testing.assert_array_equal(with_orjson, without)
    np.testing.assert_array_equal(without, x)
    assert api_mod._dumps({"a": [1.5]}) == b'{"a":[1.5]}\n'
