"""Benchmark the device agent against a bare interpreter loop on the same model, in one run.

For the digits CNN and a MobileNetV2 (alpha 0.35, digits upsampled to 96x96), each built for the
raspberry-pi target (full-int8 .tflite, LiteRT) by the build pipeline:

* predictions per second, one sample per call: a bare ``ai_edge_litert`` interpreter loop
  (pre-quantized input, set_tensor/invoke/get_tensor), the Python API (``Daemon.agent.predict``
  with statistics windows and telemetry on: outbox + MQTT to a local Mosquitto), and the HTTP API
  (keep-alive connection, one sample per request);
* statistics cost per sample (window update, batched folding into the profile) vs inference time;
* bytes per window (full window and heartbeat);
* the daemon's resident memory (``edgefleet-agent run`` with LiteRT, after 300 HTTP predictions);
* start time to first prediction (process start to the first 200 from /v1/predict, and to the
  first ``Agent.predict`` result in a fresh Python process).

The HTTP API on its own (``--api``, section *Device agent HTTP API*): the bare loop and
``POST /v1/predict`` with raw tensor bytes, ``.npy`` and JSON bodies (one sample per request, one
keep-alive ``http.client`` connection each, interleaved in one run), and a daemon process under
2,000 idle and half-sent connections (its threads and RSS, and the latency of real requests then).

Measurements run in a child process that never imports TensorFlow (the build runs first).

    .venv/bin/python -m benchmarks.agent_bench           # both models (several minutes on 2 cores)
    .venv/bin/python -m benchmarks.agent_bench --quick   # the digits CNN only
    .venv/bin/python -m benchmarks.agent_bench --api [--bundle DIR --data NPZ]   # the HTTP API rows
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import _bench  # noqa: E402
from benchmarks._bench import markdown_table, progress_print, write_section  # noqa: E402

CNN_EPOCHS = 8
MOBILENET_EPOCHS = 1  # throughput does not depend on accuracy; one epoch keeps the run short
MOBILENET_UPSAMPLE = 12  # 8x8 -> 96x96
MEASURE_S = 3.0  # per case, in turns of CHUNK calls interleaved with the other cases
CHUNK = 25
ROUNDS = 6  # best-of rounds for the statistics and conversion costs measured alone
HTTP_REQUESTS = 300
BATCH = 32
NUMPY_SUFFIX = ", numpy fallback"  # the label of a row measured with EDGEFLEET_NATIVE_KERNELS=0
WINDOW_S = 1.0
GOAL_API_RATIO = 0.9
GOAL_RSS_MB = 80.0
GOAL_FIRST_S = 1.5
GOAL_STATS_PCT = 5.0
GOAL_HTTP_BINARY_RATIO = 0.8  # HTTP with binary bodies vs the bare loop, MobileNetV2 (issue 12)
JSON_BEFORE_PER_S = 58.0  # MobileNetV2 0.35 96x96 over HTTP JSON before the bounded server (issue 12)
GOAL_JSON_FACTOR = 10.0
IDLE_CONNECTIONS = 2000
LATENCY_REQUESTS = 300
CPU_REQUESTS = 600  # requests per kind for the CPU split (client process vs agent process)


# --------------------------------------------------------------------------------------------------
# Build (TensorFlow, parent process)


def upsampled(src: Path, dst: Path, k: int) -> Path:
    d = np.load(src)
    x = np.kron(d["x"], np.ones((1, k, k, 1), dtype=np.float32)).astype(np.float32)
    np.savez(dst, x=x, y=d["y"], class_names=d["class_names"])
    return dst


def build(arch: str, data: Path, test: Path, epochs: int, work: Path) -> Path:
    from toolchain.build import build_bundles
    from toolchain.steps.data import load_dataset
    from toolchain.steps.train import train_model

    model = work / f"{arch}.keras"
    train_model(load_dataset(data), arch, epochs, model, progress=False)
    out = work / f"{arch}-bundles"
    build_bundles(
        model, data, ["raspberry-pi"], out, eval_data=test, allow_accuracy_drop=True, progress=False
    )
    return out / "raspberry-pi"


# --------------------------------------------------------------------------------------------------
# Measurements (child process, no TensorFlow)


def write_config(
    path: Path, bundle: Path, state: Path, url: str | None, listen: str, window_s: float
) -> Path:
    text = (
        f'[agent]\ndevice_id = "bench"\nfleet = "bench"\nbundle = "{bundle}"\nstate_dir = "{state}"\n'
        f"allow_unsigned = true\nthreads = 1\n[telemetry]\nwindow_s = {window_s}\n"
        "window_max_samples = 100000\n"
        f'[api]\nlisten = "{listen}"\n'
    )
    if url:
        text += f'[mqtt]\nurl = "{url}"\n'
    path.write_text(text)
    return path


def paired_rates(cases: dict[str, tuple[Any, Any]], seconds: float = MEASURE_S) -> dict[str, float]:
    """Calls per second of each ``fn(sample)``, the cases interleaved ``CHUNK`` calls at a time.

    Every case runs for about ``seconds`` in total, in short turns one after the other, so a change
    of speed of this shared machine (which moves by 10-30 % within minutes) falls on all of them
    alike: the ratios of one run compare like with like.
    """
    names = list(cases)
    spent = dict.fromkeys(names, 0.0)
    calls = dict.fromkeys(names, 0)
    pos = dict.fromkeys(names, 0)
    for fn, xs in cases.values():  # warm up
        for x in list(xs)[:20]:
            fn(x)
    clock = time.perf_counter
    end = clock() + seconds * len(names)
    while clock() < end:
        for name in names:
            fn, xs = cases[name]
            p, n = pos[name], len(xs)
            t0 = clock()
            for k in range(CHUNK):
                fn(xs[(p + k) % n])
            spent[name] += clock() - t0
            calls[name] += CHUNK
            pos[name] = (p + CHUNK) % n
    return {name: calls[name] / spent[name] for name in names}


def best_us_per_call(run: Callable[[Any], Any], n: int, prepare: Callable[[], Any] = lambda: None) -> float:
    """Microseconds per call of ``run(prepare())``, which makes ``n`` calls: best of ``ROUNDS``
    (``prepare`` is not timed)."""
    best = float("inf")
    for _ in range(ROUNDS):
        state = prepare()
        t0 = time.perf_counter()
        run(state)
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def open_idle_connections(port: int, socks: list[socket.socket]) -> None:
    """Open ``IDLE_CONNECTIONS`` connections to the agent's API, every other one a body left unfinished."""
    for i in range(IDLE_CONNECTIONS):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        if i % 2:
            s.sendall(b'POST /v1/predict HTTP/1.1\r\nContent-Length: 20000\r\n\r\n{"inputs": [')
        socks.append(s)
    time.sleep(1.0)


def bench_setup(bundle: Path, data: Path, prefix: str) -> tuple[Path, Any, np.ndarray, dict[str, Any]]:
    """Quiet logging; return (a work folder, the manifest, 200 float32 samples, the result dict)."""
    import logging

    from device_agent.formats.manifest import load_manifest

    logging.disable(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix=prefix))
    manifest = load_manifest(bundle)
    xs = np.load(data)["x"][:200].astype(np.float32)
    return work, manifest, xs, {"bundle": manifest.name, "input_shape": list(xs.shape[1:])}


def measure(bundle: Path, data: Path) -> dict[str, Any]:
    from ai_edge_litert.interpreter import Interpreter

    from device_agent.agent import Daemon, dequantize, load_config, quantize
    from device_agent.formats.telemetry import encode_stats
    from device_agent.windows import Window

    work, manifest, xs, res = bench_setup(bundle, data, "agent-bench-")

    # bare interpreter loop, pre-quantized inputs
    it = Interpreter(model_path=str(bundle / manifest.model.path), num_threads=1)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    xq = quantize(xs, manifest.inputs[0])[:, None]

    def bare(x: np.ndarray) -> Any:
        it.set_tensor(inp["index"], x)
        it.invoke()
        return it.get_tensor(out["index"])

    def bare_quantizing(x: np.ndarray) -> Any:  # what an application with float data would run
        it.set_tensor(inp["index"], quantize(x, manifest.inputs[0]))
        it.invoke()
        return dequantize(it.get_tensor(out["index"]), manifest.outputs[0])

    # Batches of BATCH: the same interpreter loop on a second interpreter resized to the batch.
    itb = Interpreter(model_path=str(bundle / manifest.model.path), num_threads=1)
    itb.resize_tensor_input(inp["index"], [BATCH, *xs.shape[1:]])
    itb.allocate_tensors()
    inb, outb = itb.get_input_details()[0], itb.get_output_details()[0]
    batches = [xs[i : i + BATCH] for i in range(0, len(xs) - BATCH + 1, BATCH)]
    qbatches = [quantize(b, manifest.inputs[0]) for b in batches]

    def bare_batch(x: np.ndarray) -> Any:
        itb.set_tensor(inb["index"], x)
        itb.invoke()
        return itb.get_tensor(outb["index"])

    mosq, url = _bench.start_mosquitto(work)
    res["telemetry"] = "outbox + MQTT (Mosquitto)" if url else "outbox only (no Mosquitto here)"
    try:
        cfg = write_config(work / "agent.toml", bundle, work / "state", url, "127.0.0.1:0", WINDOW_S)
        d = Daemon(load_config(cfg), watch_bundle=False).start()
        try:
            rates = paired_rates(
                {
                    "bare": (bare, xq),
                    "bare_q": (bare_quantizing, xs[:, None]),
                    "api": (d.agent.predict, xs),
                    "bare_batch": (bare_batch, qbatches),
                    "api_batch": (d.agent.predict, batches),
                }
            )
            res["bare_per_s"], res["api_per_s"] = rates["bare"], rates["api"]
            res["bare_q_per_s"] = rates["bare_q"]
            res["bare_batch_per_s"] = rates["bare_batch"] * BATCH
            res["api_batch_per_s"] = rates["api_batch"] * BATCH
            res["inference_us"] = 1e6 / res["bare_per_s"]
            assert d.api is not None, "the benchmark config listens on 127.0.0.1"
            host, port = d.api.address.split(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=30)
            bodies = [json.dumps({"inputs": x.tolist()}).encode() for x in xs[:50]]

            def post(body: bytes) -> None:
                conn.request("POST", "/v1/predict", body, {"Content-Type": "application/json"})
                r = conn.getresponse()
                r.read()
                assert r.status == 200

            res["http_per_s"] = paired_rates({"http": (post, bodies)}, seconds=2.0)["http"]
            conn.close()
            time.sleep(WINDOW_S * 1.5)
            res["windows_written"] = d.windows_written
            res["outbox_rows_left"] = d.outbox.depth()[0]
        finally:
            d.stop()
    finally:
        if mosq:
            mosq.terminate()
            mosq.wait(10)

    # statistics cost per sample: what a prediction adds for the window. On the native path
    # (kernels.Runner) the row is written inside the runner's call; what remains is the fold of a
    # full buffer into the profile (histograms and moments of the features, top-1 counts,
    # confidences, latencies), timed here per sample. Without the runner: Window.record_one (the
    # general single-sample path) and the folds.
    from device_agent import kernels

    model = d.agent.model
    pred = model.predictor
    scores = pred.predict(xs[:1])
    summaries = [kernels.summary(xs[i].reshape(-1)) for i in range(len(xs))]
    n = 1000
    native_runner = pred.runner is not None

    def filled() -> Window:
        w = Window(model.spec, model.ref, time.time(), time.monotonic())
        for i in range(w.rows - 1):
            w.record_one(xs[i % len(xs)][None], scores, 0.5, summaries[i % len(xs)])
        return w

    def fold(w: Window) -> None:
        w.record_one(xs[0][None], scores, 0.5, summaries[0])  # the last row: the buffers fold

    def record_n(w: Window) -> None:
        for i in range(n):
            w.record_one(xs[i % len(xs)][None], scores, 0.5, summaries[i % len(xs)])
        w.flush()

    if native_runner:
        rows = filled().rows
        res["stats_us"] = best_us_per_call(fold, 1, filled) / rows
    else:
        res["stats_us"] = best_us_per_call(
            record_n, n, lambda: Window(model.spec, model.ref, time.time(), time.monotonic())
        )
    res["native_kernels"] = kernels.NATIVE
    res["runner"] = native_runner
    # The API's own work per call, without the model (in a warm cache: the model's run is what
    # evicts it). Native: a kernels.Runner whose invoke does nothing, bound to a real window (check,
    # quantization, statistics row, decoding, the Prediction, and the folds). General path: the
    # input check and int8 conversion (Predictor.load_one, scores) plus the window record.
    if native_runner:
        from device_agent.agent import Prediction

        c = pred._in_codec
        labels = model.manifest.labels
        noop = kernels.Runner(
            lambda: None,
            np.zeros(int(np.prod(pred.sample_shape)), dtype=c.dtype),
            np.zeros(len(labels), dtype=c.dtype),
            pred.sample_shape,
            c.scale,
            c.zero_point,
            c.qmin,
            c.qmax,
            pred.out_table,
        )

        def bound() -> Window:
            w = Window(model.spec, model.ref, time.time(), time.monotonic())
            w.bind(noop, threading.Lock(), Prediction, tuple(labels), model.ref)
            return w

        def own_n(_: Window) -> None:
            for i in range(n):
                noop.predict(xs[i % len(xs)])

        res["own_us"] = best_us_per_call(own_n, n, bound)
    else:
        pred.load_one(pred.check_shape(xs[:1]))
        raw_out = pred.run_loaded()

        def convert_general(_: None) -> None:
            for i in range(n):
                pred.load_one(pred.check_shape(xs[i % len(xs)][None]))
                pred.scores(raw_out)

        res["own_us"] = best_us_per_call(convert_general, n) + res["stats_us"]

    class Locked:  # the least a thread-safe Python API does per call
        def __init__(self) -> None:
            self.lock = threading.Lock()

        def call(self, x: Any) -> Any:
            with self.lock:
                return x

    lk = Locked()

    def call_n(_: None) -> None:
        for i in range(n):
            lk.call(i)

    res["py_call_us"] = best_us_per_call(call_n, n)
    res["stats_pct"] = 100 * res["stats_us"] / res["inference_us"]
    w = Window(model.spec, model.ref, time.time(), time.monotonic())  # a full window's bytes
    record_n(w)
    closed = w.close(time.time())
    full = encode_stats(
        device_id="bench",
        fleet="bench",
        seq=1,
        window_start=closed.window_start,
        window_end=closed.window_end,
        model=closed.model,
        profile=closed.profile,
        stream="00c0ffee00c0ffee",
    )
    empty = Window(model.spec, model.ref, time.time(), time.monotonic()).close(time.time())
    hb = encode_stats(
        device_id="bench",
        fleet="bench",
        seq=2,
        window_start=empty.window_start,
        window_end=empty.window_end,
        model=empty.model,
        profile=empty.profile,
        stream="00c0ffee00c0ffee",
    )
    res["window_bytes"] = len(full)
    res["heartbeat_bytes"] = len(hb)
    res["n_features"] = len(model.spec.features.names)
    res.update(daemon_process(bundle, xs, work))
    res.update(first_python_prediction(bundle, data))
    shutil.rmtree(work, ignore_errors=True)
    return res


def daemon_process(bundle: Path, xs: np.ndarray, work: Path) -> dict[str, Any]:
    """Start ``edgefleet-agent run``; time to the first 200 from /v1/predict; RSS after HTTP_REQUESTS."""
    port = _bench.free_port()
    cfg = write_config(work / "proc.toml", bundle, work / "proc-state", None, f"127.0.0.1:{port}", 60)
    env = dict(os.environ, PYTHONPATH=str(_bench.REPO))
    body = json.dumps({"inputs": xs[0].tolist()}).encode()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "device_agent.cli", "--log-level", "error", "run", "--config", str(cfg)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = None
    try:
        while time.perf_counter() - t0 < 60:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                conn.request("POST", "/v1/predict", body, {"Content-Type": "application/json"})
                if conn.getresponse().status == 200:
                    first = time.perf_counter() - t0
                    break
            except OSError:
                time.sleep(0.01)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        for i in range(HTTP_REQUESTS):
            conn.request("POST", "/v1/predict", json.dumps({"inputs": xs[i % len(xs)].tolist()}).encode())
            conn.getresponse().read()
        status = Path(f"/proc/{proc.pid}/status").read_text()
        rss = int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024
        hwm = int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024
    finally:
        proc.terminate()
        proc.wait(30)
    return {"first_http_s": first, "rss_mb": rss, "rss_peak_mb": hwm}


def first_python_prediction(bundle: Path, data: Path) -> dict[str, Any]:
    code = (
        "import numpy as np; from device_agent import Agent; "
        f"x = np.load({str(data)!r})['x'][:1]; Agent({str(bundle)!r}).predict(x); print('ok')"
    )
    env = dict(os.environ, PYTHONPATH=str(_bench.REPO))
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    return {"first_python_s": time.perf_counter() - t0 if r.stdout.strip() == "ok" else None}


def npy_bytes(x: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, x, allow_pickle=False)
    return buf.getvalue()


def http_poster(address: str, ctype: str, extra: dict[str, str] | None = None) -> Callable[[bytes], None]:
    """``post(body)`` on one keep-alive connection (what a client that cares about speed does)."""
    host, port = address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    headers = {"Content-Type": ctype, **(extra or {})}

    def post(body: bytes) -> None:
        conn.request("POST", "/v1/predict", body, headers)
        r = conn.getresponse()
        r.read()
        if r.status != 200:
            raise RuntimeError(f"HTTP {r.status}")

    return post


def lean_raw_poster(address: str, shape: str) -> Callable[[bytes], None]:
    """``post(body)`` with the least client work: the whole request prebuilt per body and sent in one
    call on a raw keep-alive socket (TCP_NODELAY), the answer read up to its Content-Length.

    What a client in C or Go pays, roughly; the difference to ``http_poster`` is Python's http.client.
    """
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    head = (
        "POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/octet-stream\r\n"
        "X-Shape: {shape}\r\nContent-Length: {n}\r\n\r\n"
    )
    built: dict[int, bytes] = {}
    buf = bytearray(1 << 16)

    def post(body: bytes) -> None:
        req = built.get(id(body))
        if req is None:
            req = built[id(body)] = head.format(host=host, shape=shape, n=len(body)).encode() + body
        sock.sendall(req)
        got = b""
        while True:
            n = sock.recv_into(buf)
            if n == 0:
                raise RuntimeError("the agent closed the connection")
            got += bytes(buf[:n])
            end = got.find(b"\r\n\r\n")
            if end < 0:
                continue
            if not got.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(got.split(b"\r\n", 1)[0].decode())
            i = got.index(b"Content-Length: ") + 16
            if len(got) >= end + 4 + int(got[i : got.index(b"\r\n", i)]):
                return

    return post


def http_pair_poster(
    address: str, ctype: str, extra: dict[str, str] | None = None
) -> Callable[[bytes], None]:
    """``post(body)``: the body twice, on two keep-alive connections at once (two requests in flight).

    One client thread: both requests are sent before either answer is read, so the agent has the
    second one while it answers the first (what two clients of one device look like).
    """
    host, port = address.rsplit(":", 1)
    conns = [http.client.HTTPConnection(host, int(port), timeout=30) for _ in range(2)]
    headers = {"Content-Type": ctype, **(extra or {})}

    def post(body: bytes) -> None:
        for c in conns:
            c.request("POST", "/v1/predict", body, headers)
        for c in conns:
            r = c.getresponse()
            r.read()
            if r.status != 200:
                raise RuntimeError(f"HTTP {r.status}")

    return post


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_split(
    post: Callable[[Any], Any], xs: Any, pid: int | None, n: int = CPU_REQUESTS
) -> dict[str, float]:
    """Microseconds per call of ``post`` over ``n`` calls: wall, this process's CPU (the client) and
    process ``pid``'s CPU (the agent; all its threads)."""
    xs = list(xs)
    c0, a0, w0 = time.process_time(), _proc_cpu_s(pid) if pid else 0.0, time.perf_counter()
    for i in range(n):
        post(xs[i % len(xs)])
    w1, c1, a1 = time.perf_counter(), time.process_time(), _proc_cpu_s(pid) if pid else 0.0
    return {"wall_us": (w1 - w0) / n * 1e6, "client_us": (c1 - c0) / n * 1e6, "agent_us": (a1 - a0) / n * 1e6}


def measure_api(bundle: Path, data: Path) -> dict[str, Any]:
    """The bare loop and the HTTP API with raw, .npy and JSON bodies, interleaved in one run."""
    from ai_edge_litert.interpreter import Interpreter

    from device_agent.agent import quantize
    from device_agent.api import bodies as api_mod

    work, manifest, xs, res = bench_setup(bundle, data, "agent-api-bench-")
    res["json_parser"] = "orjson" if api_mod._orjson is not None else "json (stdlib)"
    res["load_before"] = os.getloadavg()[0]
    it = Interpreter(model_path=str(bundle / manifest.model.path), num_threads=1)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    xq = quantize(xs, manifest.inputs[0])[:, None]

    def bare(x: np.ndarray) -> Any:
        it.set_tensor(inp["index"], x)
        it.invoke()
        return it.get_tensor(out["index"])

    mosq, url = _bench.start_mosquitto(work)
    res["telemetry"] = "outbox + MQTT (Mosquitto)" if url else "outbox only (no Mosquitto here)"
    try:
        port = _bench.free_port()
        cfg = write_config(work / "agent.toml", bundle, work / "state", url, f"127.0.0.1:{port}", WINDOW_S)
        proc = start_agent(cfg, port)
        try:
            addr = f"127.0.0.1:{port}"
            shape = ",".join(str(n) for n in xs.shape[1:])
            cases: dict[str, tuple[Any, Any]] = {
                "bare": (bare, xq),
                "http_raw": (
                    http_poster(addr, "application/octet-stream", {"X-Shape": shape}),
                    [x.tobytes() for x in xs[:50]],
                ),
                "http_npy": (http_poster(addr, "application/x-npy"), [npy_bytes(x) for x in xs[:50]]),
                "http_raw_lean": (lean_raw_poster(addr, shape), None),
                "http_json": (
                    http_poster(addr, "application/json"),
                    [json.dumps({"inputs": x.tolist()}).encode() for x in xs[:50]],
                ),
            }
            cases["http_raw_lean"] = (cases["http_raw_lean"][0], cases["http_raw"][1])
            cases["http_raw_x2"] = (
                http_pair_poster(addr, "application/octet-stream", {"X-Shape": shape}),
                cases["http_raw"][1],
            )
            cases["http_json_x2"] = (http_pair_poster(addr, "application/json"), cases["http_json"][1])
            rates = paired_rates(cases)
            for k, v in rates.items():
                res[f"{k}_per_s"] = v * (2 if k.endswith("_x2") else 1)
            # Where one request's time goes: the client's CPU (this process), the agent's, the rest
            # is waiting (wake-ups, loopback, other processes on the machine).
            res["cpu_split"] = {"bare": cpu_split(bare, xq, None)}
            for key in ("http_raw", "http_raw_lean", "http_json"):
                res["cpu_split"][key] = cpu_split(cases[key][0], cases[key][1], proc.pid)
            res["load_after"] = os.getloadavg()[0]
            res["json_body_bytes"] = len(cases["http_json"][1][0])
            res["raw_body_bytes"] = len(cases["http_raw"][1][0])
        finally:
            proc.terminate()
            proc.wait(30)
    finally:
        if mosq:
            mosq.terminate()
            mosq.wait(10)
    # The JSON decode alone, side by side: the stdlib parse into nested lists and the conversion the
    # agent then makes (what the server before did), and the API's fast path.
    bodies = [json.dumps({"inputs": x.tolist()}).encode() for x in xs[:50]]
    fast = api_mod.JsonInputs(32)
    sample_shape = tuple(xs.shape[1:])

    def decode_before(_: None) -> None:
        for b in bodies:
            np.asarray(json.loads(b)["inputs"], dtype=np.float32)

    def decode_now(_: None) -> None:
        for b in bodies:
            if fast.fast(b, sample_shape) is None:
                raise RuntimeError("the fast path declined a body of the model's shape")

    res["json_decode_before_us"] = best_us_per_call(decode_before, len(bodies))
    res["json_decode_now_us"] = best_us_per_call(decode_now, len(bodies))
    res.update(idle_connections(bundle, xs, work))
    shutil.rmtree(work, ignore_errors=True)
    return res


def start_agent(cfg: Path, port: int) -> subprocess.Popen[bytes]:
    """``edgefleet-agent run --config cfg`` (errors only in its log); return once it accepts connections."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "device_agent.cli", "--log-level", "error", "run", "--config", str(cfg)],
        env=dict(os.environ, PYTHONPATH=str(_bench.REPO)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    t0 = time.monotonic()
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() - t0 > 60:
                proc.kill()
                raise RuntimeError("the agent did not start") from None
            time.sleep(0.05)


def _proc_status(pid: int) -> dict[str, float]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("Threads", "VmRSS", "VmHWM"):
            out[key] = float(value.split()[0])
    return out


def idle_connections(bundle: Path, xs: np.ndarray, work: Path) -> dict[str, Any]:
    """``edgefleet-agent run`` with IDLE_CONNECTIONS open (half idle, half half-sent requests): its
    threads and RSS, and the latency of real requests (raw bodies and JSON) meanwhile."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 2 * IDLE_CONNECTIONS + 256)), hard))
    port = _bench.free_port()
    cfg = write_config(work / "idle.toml", bundle, work / "idle-state", None, f"127.0.0.1:{port}", 60)
    cfg.write_text(
        cfg.read_text() + f"max_connections = {2 * IDLE_CONNECTIONS}\n"
    )  # [api] is the last table (no [mqtt])

    proc = start_agent(cfg, port)
    socks: list[socket.socket] = []
    shape = ",".join(str(n) for n in xs.shape[1:])
    try:
        raw = http_poster(f"127.0.0.1:{port}", "application/octet-stream", {"X-Shape": shape})
        for i in range(50):
            raw(xs[i].tobytes())
        before = _proc_status(proc.pid)
        open_idle_connections(port, socks)
        during = _proc_status(proc.pid)
        lat: dict[str, list[float]] = {"raw": [], "json": []}
        post_json = http_poster(f"127.0.0.1:{port}", "application/json")
        bodies = {
            "raw": [x.tobytes() for x in xs[:50]],
            "json": [json.dumps({"inputs": x.tolist()}).encode() for x in xs[:50]],
        }
        for i in range(LATENCY_REQUESTS):
            for kind, post in (("raw", raw), ("json", post_json)):
                t = time.perf_counter()
                post(bodies[kind][i % 50])
                lat[kind].append(time.perf_counter() - t)
        res: dict[str, Any] = {
            "idle_threads_before": before["Threads"],
            "idle_threads": during["Threads"],
            "idle_rss_before_mb": before["VmRSS"] / 1024,
            "idle_rss_mb": during["VmRSS"] / 1024,
        }
        for kind, v in lat.items():
            res[f"idle_{kind}_p50_ms"] = float(np.percentile(v, 50) * 1e3)
            res[f"idle_{kind}_p99_ms"] = float(np.percentile(v, 99) * 1e3)
        return res
    finally:
        for s in socks:
            s.close()
        proc.terminate()
        proc.wait(30)


def report_api(results: list[tuple[str, dict[str, Any]]], notes: list[str]) -> None:
    rows, goals = [], []
    for label, r in results:
        bare = r["bare_per_s"]
        rows.append(
            [
                label,
                bare,
                r["http_raw_per_s"],
                f"{r['http_raw_per_s'] / bare:.2f}x",
                r["http_npy_per_s"],
                f"{r['http_npy_per_s'] / bare:.2f}x",
                r["http_json_per_s"],
                f"{r['http_json_per_s'] / bare:.2f}x",
                r["http_raw_x2_per_s"],
                f"{r['http_raw_x2_per_s'] / bare:.2f}x",
                r["http_raw_lean_per_s"],
                f"{r['http_raw_lean_per_s'] / bare:.2f}x",
                r["http_json_x2_per_s"],
                r["json_decode_before_us"],
                r["json_decode_now_us"],
                r["json_body_bytes"],
                r["raw_body_bytes"],
            ]
        )
        if "MobileNet" in label:
            for key, how in (
                ("http_raw", "one connection"),
                ("http_raw_x2", "two requests in flight"),
                ("http_raw_lean", "one connection, lean client (prebuilt request, raw socket)"),
            ):
                ratio = r[f"{key}_per_s"] / bare
                goals.append(
                    f"{label}: HTTP with raw tensor bodies, {how}, {ratio:.2f}x the bare loop"
                    f" (goal >= {GOAL_HTTP_BINARY_RATIO}x): {'met' if ratio >= GOAL_HTTP_BINARY_RATIO else 'MISSED'}"
                )
            for key, how in (("http_json", "one connection"), ("http_json_x2", "two requests in flight")):
                factor = r[f"{key}_per_s"] / JSON_BEFORE_PER_S
                goals.append(
                    f"{label}: HTTP with JSON bodies, {how}, {r[f'{key}_per_s']:,.0f}/s, {factor:.1f}x the"
                    f" {JSON_BEFORE_PER_S:.0f}/s of the server before (issue 12; goal >= {GOAL_JSON_FACTOR:.0f}x):"
                    f" {'met' if factor >= GOAL_JSON_FACTOR else 'MISSED'}"
                )
    idle_rows = [
        [
            label,
            f"{r['idle_threads_before']:.0f} -> {r['idle_threads']:.0f}",
            f"{r['idle_rss_before_mb']:.1f} -> {r['idle_rss_mb']:.1f}",
            r["idle_raw_p50_ms"],
            r["idle_raw_p99_ms"],
            r["idle_json_p50_ms"],
            r["idle_json_p99_ms"],
        ]
        for label, r in results
    ]
    table = markdown_table(
        [
            "model",
            "bare loop /s",
            "HTTP raw /s",
            "raw/bare",
            "HTTP .npy /s",
            "npy/bare",
            "HTTP JSON /s",
            "JSON/bare",
            "HTTP raw, 2 in flight /s",
            "raw 2 in flight/bare",
            "HTTP raw, lean client /s",
            "raw lean/bare",
            "HTTP JSON, 2 in flight /s",
            "JSON decode us, json + nested lists",
            "JSON decode us, fast path",
            "JSON body bytes",
            "raw body bytes",
        ],
        rows,
    )
    idle = markdown_table(
        [
            "model",
            "daemon threads",
            "daemon RSS MB",
            "raw p50 ms",
            "raw p99 ms",
            "JSON p50 ms",
            "JSON p99 ms",
        ],
        idle_rows,
    )
    split_rows = []
    kinds = {
        "bare": "bare loop (the model alone, in the benchmark process; its CPU under agent)",
        "http_raw": "HTTP raw, http.client",
        "http_raw_lean": "HTTP raw, lean client",
        "http_json": "HTTP JSON, http.client",
    }
    for label, r in results:
        for key, name in kinds.items():
            c = r.get("cpu_split", {}).get(key)
            if c is None:
                continue
            agent = c["agent_us"] if key != "bare" else c["client_us"]
            client = c["client_us"] if key != "bare" else 0.0
            split_rows.append(
                [label, name, c["wall_us"], client, agent, max(0.0, c["wall_us"] - client - agent)]
            )
    split = markdown_table(
        ["model", "kind", "wall us/request", "client CPU us", "agent CPU us", "waiting us (wall - CPU)"],
        split_rows,
    )
    why = []
    floor = next((r for label, r in results if "CNN" in label), None)
    for label, r in results:
        bare = r["bare_per_s"]
        if "MobileNet" not in label or r["http_raw_per_s"] / bare >= GOAL_HTTP_BINARY_RATIO:
            continue
        budget = 1e6 / bare * (1 / GOAL_HTTP_BINARY_RATIO - 1)
        added = 1e6 / r["http_raw_per_s"] - 1e6 / bare
        text = (
            f"{label}, raw bodies: at {GOAL_HTTP_BINARY_RATIO}x, HTTP may add {budget:.0f} us per request to the"
            f" model's {1e6 / bare:.0f} us; it adds {added:.0f} us."
        )
        cs = r.get("cpu_split", {})
        if "http_raw" in cs and "http_raw_lean" in cs:
            text += (
                f" Measured alone ({CPU_REQUESTS} requests): the http.client client spends"
                f" {cs['http_raw']['client_us']:.0f} us of CPU per request (the lean client"
                f" {cs['http_raw_lean']['client_us']:.0f} us), the agent {cs['http_raw']['agent_us']:.0f} us"
                f" (its model {cs['bare']['client_us']:.0f} us in the bare loop; the other"
                f" {cs['http_raw']['agent_us'] - cs['bare']['client_us']:.0f} us are the HTTP server, the statistics"
                " window and telemetry, and a model run whose caches the request traffic has cooled). The two"
                " processes take turns, so the wall time per request"
                f" ({cs['http_raw']['wall_us']:.0f} us) is about the sum of the two."
            )
        if floor is not None:
            rt = 1e6 / floor["http_raw_per_s"] - 1e6 / floor["bare_per_s"]
            text += (
                f" With the digits CNN (a {1e6 / floor['bare_per_s']:.0f} us model) a whole request costs"
                f" {1e6 / floor['http_raw_per_s']:.0f} us in the same run: {rt:.0f} us for the http.client client,"
                " the loopback and this server, with a model that leaves the caches warm"
                + (". That round trip alone is more than the budget." if rt > budget else ".")
            )
        why.append(text)
    for label, r in results:
        factor = r["http_json_per_s"] / JSON_BEFORE_PER_S
        cs = r.get("cpu_split", {})
        if "MobileNet" not in label or factor >= GOAL_JSON_FACTOR or "http_json" not in cs:
            continue
        js = cs["http_json"]
        why.append(
            f"{label}, JSON bodies, one connection: {GOAL_JSON_FACTOR:.0f}x is"
            f" {GOAL_JSON_FACTOR * JSON_BEFORE_PER_S:.0f}/s, {1e6 / (GOAL_JSON_FACTOR * JSON_BEFORE_PER_S):.0f} us"
            f" per request; this run took {1e6 / r['http_json_per_s']:.0f} us. Measured alone ({CPU_REQUESTS}"
            f" requests): the agent spends {js['agent_us']:.0f} us of CPU per request (the model"
            f" {cs['bare']['client_us']:.0f} us of it in the bare loop, the JSON decode {r['json_decode_now_us']:.0f} us"
            f" measured apart), the http.client client {js['client_us']:.0f} us; the two processes take turns,"
            " so on a machine whose other jobs hold the cores each turn also waits for a core."
        )
    if why:
        body_why = "\n\n**Where it falls short, and why**\n\n" + "\n".join(f"- {w}" for w in why)
    else:
        body_why = ""
    parsers = ", ".join(sorted({r["json_parser"] for _, r in results})) or "-"
    intro = (
        "`benchmarks/agent_bench.py --api`. Raspberry-pi bundles (full-int8 .tflite, LiteRT, 1 thread). *Bare loop*:"
        " `ai_edge_litert` set_tensor/invoke/get_tensor on pre-quantized inputs. *HTTP*: `POST /v1/predict`, one"
        " float32 sample per request, each kind on its own keep-alive `http.client` connection from the benchmark's"
        " process to `edgefleet-agent run` (statistics windows and telemetry on): *raw* is `application/octet-stream`"
        ' with `X-Shape`, *.npy* `application/x-npy`, *JSON* `{"inputs": x.tolist()}` (parser:'
        f" {parsers}). *2 in flight*: two keep-alive connections, both requests sent before either answer is"
        " read (two clients of one device; inference stays one at a time, the agent serializes it). *Lean"
        " client*: the same raw requests prebuilt and sent in one call on a raw socket, the answer read up to"
        " its Content-Length (about what a C or Go client costs; the gap to the http.client row is the"
        " benchmark's own client, which shares this machine's 2 cores with the agent). *JSON"
        " decode*: one body to a float32 array in the benchmark's process, best of rounds: `json.loads` and"
        " `numpy.asarray` of the nested lists (the server before) against the API's fast path. The cases"
        f" are interleaved {CHUNK} calls at a time for {MEASURE_S:g} s each. *Under"
        f" {IDLE_CONNECTIONS:,} connections*: `edgefleet-agent run` (4 request workers) with {IDLE_CONNECTIONS:,}"
        " connections open, half of them idle and half with a request sent up to its body; threads and RSS"
        f" before -> during, and the latency of {LATENCY_REQUESTS} real requests of each kind meanwhile."
    )
    loads = "; ".join(
        f"{label}: {r['load_before']:.1f} -> {r['load_after']:.1f}"
        for label, r in results
        if "load_before" in r
    )
    if loads:
        intro += (
            f" 1-minute load average of the machine before -> after the measurements ({loads}): above 2, other"
            " jobs shared the 2 cores, which costs the HTTP rows (two processes to wake per request) more"
            " than the bare loop (one)."
        )
    body = table + "\n" + "\n".join(f"- {g}" for g in goals + notes)
    body += body_why
    if split_rows:
        body += (
            f"\n\n**Where one request's time goes** ({CPU_REQUESTS} requests of each kind on one connection,"
            " after the rows above; CPU from `time.process_time` in the client and `/proc/PID/stat` for the"
            " agent, all its threads)\n\n" + split
        )
    body += f"\n\n**Under {IDLE_CONNECTIONS:,} idle and half-sent connections**\n\n" + idle
    print(table)
    print(split)
    print(idle)
    print("\n".join(goals + notes))
    write_section("agent_api", "Device agent HTTP API", body=body, intro=intro)


def run_api(quick: bool, bundle: Path | None, data: Path | None, as_json: bool) -> None:
    work = Path(tempfile.mkdtemp(prefix="agent-api-build-"))
    models: list[tuple[str, Path, Path]] = []
    if bundle is not None and data is not None:
        models.append((f"{load_name(bundle)} (given bundle)", bundle, data))
    else:
        progress_print("== digits CNN (8x8): training and building the raspberry-pi bundle ...")
        models.append(
            (
                "digits CNN (8x8)",
                build("cnn", _bench.DIGITS, _bench.DIGITS_TEST, CNN_EPOCHS, work),
                _bench.DIGITS_TEST,
            )
        )
        if not quick:
            d96 = upsampled(_bench.DIGITS, work / "d96.npz", MOBILENET_UPSAMPLE)
            t96 = upsampled(_bench.DIGITS_TEST, work / "d96_test.npz", MOBILENET_UPSAMPLE)
            progress_print("== MobileNetV2 0.35 (96x96x1): training and building the raspberry-pi bundle ...")
            models.append(
                ("MobileNetV2 0.35 (96x96x1)", build("mobilenetv2", d96, t96, MOBILENET_EPOCHS, work), t96)
            )
    results: list[tuple[str, dict[str, Any]]] = []
    notes: list[str] = []
    for label, b, t in models:
        progress_print(f"== {label}: measuring the HTTP API (child process without TensorFlow) ...")
        r = subprocess.run(
            [sys.executable, "-m", "benchmarks.agent_bench", "--measure-api", str(b), str(t)],
            capture_output=True,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(_bench.REPO)),
            cwd=str(_bench.REPO),
            timeout=1800,
        )
        if r.returncode != 0:
            notes.append(f"{label}: measurement failed: {r.stderr.strip().splitlines()[-1:]}")
            continue
        results.append((label, json.loads(r.stdout.strip().splitlines()[-1])))
    shutil.rmtree(work, ignore_errors=True)
    if as_json:
        print(json.dumps({"results": dict(results), "notes": notes}))
    report_api(results, notes)


def load_name(bundle: Path) -> str:
    from device_agent.formats.manifest import load_manifest

    m = load_manifest(bundle)
    arch = "MobileNetV2 0.35" if "mobilenet" in m.name.lower() else m.name
    return f"{arch} ({'x'.join(str(n) for n in m.inputs[0].shape[1:])})"


# --------------------------------------------------------------------------------------------------


def run(quick: bool, as_json: bool) -> None:
    work = Path(tempfile.mkdtemp(prefix="agent-bench-build-"))
    models = [("digits CNN (8x8)", "cnn", _bench.DIGITS, _bench.DIGITS_TEST, CNN_EPOCHS)]
    if not quick:
        models.append(
            (
                "MobileNetV2 0.35 (96x96x1)",
                "mobilenetv2",
                upsampled(_bench.DIGITS, work / "d96.npz", MOBILENET_UPSAMPLE),
                upsampled(_bench.DIGITS_TEST, work / "d96_test.npz", MOBILENET_UPSAMPLE),
                MOBILENET_EPOCHS,
            )
        )
    results: list[tuple[str, dict[str, Any]]] = []
    notes: list[str] = []
    for label, arch, data, test, epochs in models:
        progress_print(f"== {label}: training and building the raspberry-pi bundle ...")
        try:
            bundle = build(arch, data, test, epochs, work)
        except Exception as e:  # record what is missing instead of dying
            notes.append(f"{label}: not measured, the build failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        # The same bundle twice: with the C kernels, then on the numpy fallbacks (what an install
        # without a C compiler runs), so the two sit side by side from one run.
        for suffix, native in (("", "1"), (NUMPY_SUFFIX, "0")):
            progress_print(f"== {label}{suffix}: measuring (child process without TensorFlow) ...")
            env = dict(os.environ, PYTHONPATH=str(_bench.REPO), EDGEFLEET_NATIVE_KERNELS=native)
            r = subprocess.run(
                [sys.executable, "-m", "benchmarks.agent_bench", "--measure", str(bundle), str(test)],
                capture_output=True,
                text=True,
                env=env,
                cwd=str(_bench.REPO),
                timeout=1800,
            )
            if r.returncode != 0:
                notes.append(f"{label}{suffix}: measurement failed: {r.stderr.strip().splitlines()[-1:]}")
                continue
            results.append((label + suffix, json.loads(r.stdout.strip().splitlines()[-1])))
    shutil.rmtree(work, ignore_errors=True)
    if as_json:
        print(json.dumps({"results": dict(results), "notes": notes}))
    report(results, notes)


def report(results: list[tuple[str, dict[str, Any]]], notes: list[str]) -> None:
    rows, goals = [], []
    by_label = dict(results)
    for label, r in results:
        ratio = r["api_per_s"] / r["bare_per_s"]
        overhead_us = 1e6 / r["api_per_s"] - 1e6 / r["bare_per_s"]
        rows.append(
            [
                label,
                r["bare_per_s"],
                r["api_per_s"],
                f"{ratio:.2f}x",
                f"{r['api_per_s'] / r['bare_q_per_s']:.2f}x",
                f"{r['api_batch_per_s'] / r['bare_batch_per_s']:.2f}x",
                overhead_us,
                r["own_us"],
                r["http_per_s"],
                r["inference_us"],
                r["stats_us"],
                f"{r['stats_pct']:.1f}%",
                r["window_bytes"],
                r["heartbeat_bytes"],
                r["rss_mb"],
                r["first_http_s"],
                r["first_python_s"],
            ]
        )
        if label.endswith(NUMPY_SUFFIX):  # the goals are the native path's; the fallback is compared
            nat = by_label.get(label[: -len(NUMPY_SUFFIX)])
            if nat is not None:
                notes.append(
                    f"{label}: Python API {r['api_per_s']:,.0f}/s vs {nat['api_per_s']:,.0f}/s native"
                    f" ({nat['api_per_s'] / r['api_per_s']:.2f}x faster native); API work"
                    f" {r['own_us']:.2f} vs {nat['own_us']:.2f} us/call; stats {r['stats_us']:.3f} vs"
                    f" {nat['stats_us']:.3f} us/sample"
                )
            continue
        goals.append(
            f"{label}: Python API {ratio:.2f}x the bare loop, one sample per call (goal >= {GOAL_API_RATIO}x): "
            f"{'met' if ratio >= GOAL_API_RATIO else 'MISSED'}"
        )
        bratio = r["api_batch_per_s"] / r["bare_batch_per_s"]
        goals.append(
            f"{label}: Python API {bratio:.2f}x the bare loop with batches of {BATCH}"
            f" ({r['api_batch_per_s']:,.0f} vs {r['bare_batch_per_s']:,.0f} samples/s; goal >= {GOAL_API_RATIO}x):"
            f" {'met' if bratio >= GOAL_API_RATIO else 'MISSED'}"
        )
        goals.append(
            f"{label}: daemon RSS {r['rss_mb']:.1f} MB (goal <= {GOAL_RSS_MB:.0f} MB with LiteRT): "
            f"{'met' if r['rss_mb'] <= GOAL_RSS_MB else 'MISSED'}"
        )
        if r["first_http_s"] is not None:
            goals.append(
                f"{label}: first prediction {r['first_http_s']:.2f} s after start (goal <= {GOAL_FIRST_S} s):"
                f" {'met' if r['first_http_s'] <= GOAL_FIRST_S else 'MISSED'}"
            )
        if "MobileNet" in label:
            goals.append(
                f"{label}: statistics cost {r['stats_pct']:.1f}% of inference (goal <= {GOAL_STATS_PCT}%): "
                f"{'met' if r['stats_pct'] <= GOAL_STATS_PCT else 'MISSED'}"
            )
    why = []
    for label, r in results:
        if label.endswith(NUMPY_SUFFIX):
            continue
        ratio = r["api_per_s"] / r["bare_per_s"]
        if ratio < GOAL_API_RATIO:
            budget = r["inference_us"] * (1 / GOAL_API_RATIO - 1)
            overhead = 1e6 / r["api_per_s"] - 1e6 / r["bare_per_s"]
            why.append(
                f"{label}, one sample per call: at {GOAL_API_RATIO}x the API may add {budget:.1f} us per call to"
                f" the model's {r['inference_us']:.1f} us. It adds {overhead:.1f} us; its own work takes"
                f" {r['own_us']:.2f} us per call in a warm cache (the statistics {r['stats_us']:.2f} us of it),"
                f" the rest is cache misses after the model's run (a bare Python method call that takes a"
                f" lock costs {r['py_call_us']:.2f} us here). The bare loop is fed int8 inputs quantized before the run;"
                f" against the same loop quantizing float inputs with numpy, as an application with float"
                f" data must, the API reaches {r['api_per_s'] / r['bare_q_per_s']:.2f}x."
            )
        bratio = r["api_batch_per_s"] / r["bare_batch_per_s"]
        if bratio < GOAL_API_RATIO:
            per = 1e6 / r["bare_batch_per_s"]
            added = 1e6 / r["api_batch_per_s"] - per
            why.append(
                f"{label}, batches of {BATCH}: the model takes {per:.2f} us per sample, and at"
                f" {GOAL_API_RATIO}x the API may add {per * (1 / GOAL_API_RATIO - 1):.2f} us. It adds"
                f" {added:.2f} us per sample. The statistics alone take {r['stats_us']:.2f} us of that (measured"
                f" apart, in a warm cache): exact histograms and moments of {r['n_features']} features per"
                " sample, folded every 1,024 samples. The rest is the batch's check, conversion, decoding"
                " and result, and the cache misses the model's run leaves behind."
            )
    table = markdown_table(
        [
            "model",
            "bare loop /s",
            "Python API /s",
            "API/bare",
            "API/bare with quantize",
            f"API/bare, batches of {BATCH}",
            "API overhead us/call",
            "API work us/call, no model",
            "HTTP API /s",
            "inference us",
            "stats us/sample",
            "stats/inference",
            "window bytes",
            "heartbeat bytes",
            "daemon RSS MB",
            "first HTTP prediction s",
            "first Python prediction s",
        ],
        rows,
    )
    tele = ", ".join(sorted({r["telemetry"] for _, r in results})) or "-"
    native = {r.get("native_kernels") for label, r in results if not label.endswith(NUMPY_SUFFIX)}
    kernels = (
        "native kernels (device_agent._kernels); the rows marked"
        f" *{NUMPY_SUFFIX.strip(', ')}* are the same bundle in the same run with `EDGEFLEET_NATIVE_KERNELS=0`"
        " (numpy only, what an install without a C compiler runs; no `kernels.Runner`)"
        if native == {True}
        else "numpy fallbacks (device_agent._kernels not built)"
    )
    intro = (
        "`benchmarks/agent_bench.py`. Raspberry-pi bundles (full-int8 .tflite) built by the pipeline, run in "
        "LiteRT with 1 thread, one sample per call. *Bare loop*: `ai_edge_litert` "
        "set_tensor/invoke/get_tensor on pre-quantized inputs; *bare with quantize*: the same loop fed the float "
        "inputs the API gets, quantized and dequantized with numpy as an application would; *batches of "
        f"{BATCH}*: the bare loop on an interpreter resized to {BATCH} and the API called with {BATCH} samples. "
        "*Python API*: `Daemon.agent.predict` (input "
        "checks, quantization, dequantization, statistics windows of "
        f"{WINDOW_S:g} s, telemetry: {tele}; {kernels}; float32 samples, and batches of a size seen "
        "twice in a row, run through `kernels.Runner`, one C call each). The cases run in one process, interleaved "
        f"{CHUNK} calls at a time for {MEASURE_S:g} s each, so the machine's changes of speed fall on all "
        "of them alike. *HTTP API*: "
        "POST /v1/predict with JSON over one keep-alive connection. *Stats*: what one prediction adds to "
        "the window (with the runner: the fold of a full buffer into the profile, per sample; the row itself "
        "is written inside the runner's call). *API overhead*: 1/API rate - "
        "1/bare rate; *API work, no model*: the API's own work per call measured alone, in a warm cache "
        "(with the runner: a `kernels.Runner` whose invoke does nothing, bound to a real window). *Window bytes*: a closed "
        "window's stats payload; *heartbeat*: an empty one. *RSS*: `edgefleet-agent run` after 300 HTTP "
        "predictions. *First prediction*: from process start to the first answer (HTTP: the daemon; "
        "Python: `Agent(bundle).predict` in a fresh interpreter)."
    )
    body = table + "\n" + "\n".join(f"- {g}" for g in goals + notes)
    if why:
        body += "\n\n**Where it falls short, and why**\n\n" + "\n".join(f"- {w}" for w in why)
    print(table)
    print("\n".join(goals + notes))
    write_section("agent", "Device agent", body=body, intro=intro)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="digits CNN only")
    ap.add_argument("--json", action="store_true", help="also print the raw results as JSON")
    ap.add_argument("--api", action="store_true", help="only the HTTP API rows (section agent_api)")
    ap.add_argument("--bundle", type=Path, help="with --api: measure this built bundle instead of building")
    ap.add_argument("--data", type=Path, help="with --bundle: the .npz of inputs for it")
    ap.add_argument("--measure", nargs=2, metavar=("BUNDLE", "DATA"), help=argparse.SUPPRESS)
    ap.add_argument("--measure-api", nargs=2, metavar=("BUNDLE", "DATA"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), Path(args.measure[1]))))
        return
    if args.measure_api:
        print(json.dumps(measure_api(Path(args.measure_api[0]), Path(args.measure_api[1]))))
        return
    if args.api:
        if (args.bundle is None) != (args.data is None):
            ap.error("--bundle and --data go together")
        run_api(args.quick, args.bundle, args.data, args.json)
        return
    run(args.quick, args.json)


if __name__ == "__main__":
    main()
