"""Helpers shared by the integration tests: polling, HTTP calls, and ``edgefleet-agent run`` processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEADLINE_S = 30.0


def stop_process(proc: subprocess.Popen[Any] | None, timeout_s: float = 10.0) -> None:
    """Terminate ``proc`` if it runs (a clean stop), killing it after ``timeout_s``."""
    if proc is not None and proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def child_pids(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def subscribe_json(port: int, topic: str) -> tuple[Any, list[dict[str, Any]]]:
    """A paho MQTT 5 client on 127.0.0.1:``port`` subscribed to ``topic`` (QoS 1, SUBACK awaited).

    Returns (client, list that collects each message's JSON); the caller stops the client's loop.
    """
    import threading

    import paho.mqtt.client as mqtt

    got: list[dict[str, Any]] = []
    ready = threading.Event()
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.on_message = lambda c, u, m: got.append(json.loads(m.payload))
    client.on_subscribe = lambda *a: ready.set()
    client.connect("127.0.0.1", port)
    client.subscribe(topic, qos=1)
    client.loop_start()
    assert ready.wait(10), f"no SUBACK for {topic}"
    return client, got


EDGEFLEET = [sys.executable, "-c", "from toolchain.cli import main; main()"]  # `edgefleet` in a subprocess


def run_edgefleet(
    args: list[str], env: dict[str, str], timeout_s: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run ``edgefleet ARGS`` to completion in a child process; raise when it exits non-zero."""
    return subprocess.run(
        [*EDGEFLEET, *args], env=env, capture_output=True, text=True, check=True, timeout=timeout_s
    )


def wait_for(pred: Callable[[], Any], timeout_s: float = DEADLINE_S, what: str = "condition") -> Any:
    """Poll ``pred`` until it returns something truthy; fail after ``timeout_s`` with its last value."""
    deadline = time.monotonic() + timeout_s
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what} (last value {v!r})")
        time.sleep(0.05)


def http_call(
    url: str, body: Any = None, raw: bytes | None = None, timeout_s: float = 20.0
) -> tuple[int, Any]:
    """POST ``body`` as JSON (or ``raw`` bytes), or GET without either; return (status, JSON or text)."""
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            code, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        code, text = e.code, e.read().decode()
    try:
        return code, json.loads(text)
    except ValueError:
        return code, text


class AgentRun:
    """``edgefleet-agent run --config CONFIG`` in a subprocess started through a Python ``prelude``
    (which patches module constants, then calls the CLI), with its output in ``log_path``."""

    def __init__(self, prelude: str, config: Path, log_path: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.log_path = log_path
        self._log = open(log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", prelude, "run", "--config", str(config)],
            stdout=self._log,
            stderr=self._log,
            env=dict(os.environ, PYTHONPATH=str(REPO), **(env or {})),
            cwd=str(REPO),
        )
        self._base: str | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def exited(self) -> None:
        """Fail with the log's tail when the process has exited."""
        if self.proc.poll() is not None:
            raise AssertionError(f"agent exited with {self.proc.returncode}:\n{self.log()[-3000:]}")

    def api_base(self, timeout_s: float = 60.0) -> str:
        """The local API's base URL, from the log's "listening on" line."""
        if self._base is None:

            def find() -> str | None:
                for line in self.log().splitlines():
                    if "listening on " in line:
                        return "http://" + line.rsplit("listening on ", 1)[1].strip()
                self.exited()
                return None

            self._base = str(wait_for(find, timeout_s, "the agent's API"))
        return self._base

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def kill(self) -> None:
        """SIGKILL (a power cut, as far as the agent can tell)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self._log.close()

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit in time."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()

    def wait(self, timeout_s: float = 30) -> int:
        rc = self.proc.wait(timeout_s)
        self._log.close()
        return rc
