"""The local HTTP API on real sockets: predict, 400s counted as violations, health, metrics, Unix socket."""

from __future__ import annotations

import http.client as httpclient
import json
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.api import ApiServer
from tests.device_agent.agent_bundles import cached_onnx_bundle, digits
from tests.device_agent.agent_helpers import http


@pytest.fixture
def server() -> Iterator[tuple[ApiServer, str]]:
    srv = ApiServer(Agent(cached_onnx_bundle()), "127.0.0.1:0")
    srv.start()
    try:
        yield srv, "http://" + srv.address
    finally:
        srv.shutdown()


@pytest.fixture(scope="module")
def x_test() -> np.ndarray:
    return digits()["x_test"]


@pytest.mark.timeout(60)
def test_predict_batch_and_single(server, x_test: np.ndarray) -> None:
    srv, base = server
    code, out = http(base, "/v1/predict", {"inputs": x_test[:4].tolist()})
    assert code == 200
    assert set(out) == {"outputs", "labels", "scores", "model", "ids"}
    assert len(out["outputs"]) == 4 and len(out["outputs"][0]) == 10
    assert out["labels"] == srv.agent.predict(x_test[:4]).labels
    assert out["model"] == srv.agent.model.ref.to_dict()
    assert all(0 < s <= 1 for s in out["scores"])
    code, one = http(base, "/v1/predict", {"inputs": x_test[0].tolist()})
    assert code == 200 and one["labels"] == out["labels"][:1]


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("raw", "reason", "msg"),
    [
        (b"{not json", "json", "bad JSON"),
        (b'{"input": []}', "json", "inputs"),
        (b'{"inputs": [1, 2, 3]}', "shape", "does not fit the model"),
        (b'{"inputs": [[1, 2], [3]]}', "shape", "rectangular"),
        (json.dumps({"inputs": [[["a"] * 1] * 8] * 8}).encode(), "dtype", "not numeric"),
        (
            b'{"inputs": '
            + json.dumps(np.full((8, 8, 1), 1.0).tolist()).replace("1.0", "NaN", 1).encode()
            + b"}",
            "nan",
            "NaN",
        ),
    ],
)
def test_bad_requests_are_400_one_line_and_counted(server, raw: bytes, reason: str, msg: str) -> None:
    srv, base = server
    code, out = http(base, "/v1/predict", raw=raw)
    assert code == 400 and msg in out["error"] and "\n" not in out["error"]
    window = srv.agent.close_window()
    assert window.profile.schema_violations == {reason: 1}
    metrics = http(base, "/metrics")[1]
    assert f'edgefleet_agent_http_errors_total{{reason="{reason}"}} 1' in metrics
    # and the server keeps serving
    assert http(base, "/v1/health")[0] == 200


@pytest.mark.timeout(60)
def test_health_metrics_and_unknown_paths(server, x_test: np.ndarray) -> None:
    srv, base = server
    for _ in range(3):
        http(base, "/v1/predict", {"inputs": x_test[:2].tolist()})
    code, health = http(base, "/v1/health")
    assert code == 200 and health["model"]["name"] == "digits-dense" and health["status"] == "ok"
    code, text = http(base, "/metrics")
    assert code == 200
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert lines['edgefleet_agent_http_requests_total{path="/v1/predict",code="200"}'] == "3"
    assert lines['edgefleet_agent_predict_latency_seconds_bucket{le="+Inf"}'] == "3"
    assert lines["edgefleet_agent_predictions_total"] == "6"
    assert lines["edgefleet_agent_model_version"] == "1"
    assert any(k.startswith("edgefleet_agent_model_info{") for k in lines)
    assert http(base, "/nope")[0] == 404
    assert http(base, "/v1/predict")[0] == 405


@pytest.mark.timeout(60)
def test_missing_length_and_oversized_body(server) -> None:
    srv, base = server
    host, port = srv.address.split(":")
    conn = httpclient.HTTPConnection(host, int(port), timeout=10)
    conn.putrequest("POST", "/v1/predict")
    conn.putheader("Content-Length", str(10**9))
    conn.endheaders()
    r = conn.getresponse()
    assert r.status == 413 and "exceeds" in json.loads(r.read())["error"]
    conn.close()


@pytest.mark.timeout(60)
def test_unix_socket(x_test: np.ndarray) -> None:
    path = Path(tempfile.mkdtemp(prefix="ef-api-")) / "agent.sock"
    srv = ApiServer(Agent(cached_onnx_bundle()), f"unix:{path}")
    srv.start()
    try:
        body = json.dumps({"inputs": x_test[:2].tolist()}).encode()
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(path))
            s.sendall(
                b"POST /v1/predict HTTP/1.1\r\nHost: agent\r\nContent-Type: application/json\r\n"
                b"Connection: close\r\nContent-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        head, _, payload = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and len(json.loads(payload)["labels"]) == 2
    finally:
        srv.shutdown()
    assert not path.exists()
