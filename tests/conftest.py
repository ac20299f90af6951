"""Shared fixtures: real services on 127.0.0.1 (Mosquitto, PostgreSQL), the digits data, tiny models.

A missing service skips its tests when run by hand, and fails them under ``./run test``
(``EDGEFLEET_REQUIRE_SERVICES=1``), so CI can never go green by skipping the real parts.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import stop_process

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "calibration_data"
REQUIRE = os.environ.get("EDGEFLEET_REQUIRE_SERVICES") == "1"
SERVICE_START_TIMEOUT_S = 30.0


def missing_service(what: str) -> None:
    """Skip (by hand) or fail (under ./run test) when a real service is not available."""
    if REQUIRE:
        pytest.fail(f"{what} is required under ./run test but is not available", pytrace=False)
    pytest.skip(f"{what} not available")


def free_port() -> int:
    """Return a free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout_s: float = SERVICE_START_TIMEOUT_S) -> None:
    """Block until something listens on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout_s} s")


# --------------------------------------------------------------------------------------------------
# Mosquitto


def mosquitto_binary() -> str | None:
    return shutil.which("mosquitto") or (
        ("/usr/sbin/mosquitto") if os.path.exists("/usr/sbin/mosquitto") else None
    )


class Mosquitto:
    """A real Mosquitto broker on 127.0.0.1 that a test can stop and start again on the same port."""

    def __init__(self, workdir: Path, extra_conf: str = "") -> None:
        self.binary = mosquitto_binary()
        self.port = free_port()
        self.workdir = workdir
        self.conf = workdir / "mosquitto.conf"
        # As root, Mosquitto drops to user "mosquitto", which cannot read files in root's private temp
        # dirs (password files, certificates); keep it as the test's own user instead.
        as_root = "user root\n" if os.geteuid() == 0 else ""
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence false\n{as_root}"
            f"log_dest file {workdir / 'mosquitto.log'}\n{extra_conf}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> None:
        assert self.binary
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_port(self.port)

    def stop(self) -> None:
        stop_process(self.proc)
        self.proc = None


@pytest.fixture
def fast_reconnect(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short agent reconnect, connect and shutdown-flush constants for in-process daemons."""
    from tests.device_agent.agent_helpers import fast_mqtt

    fast_mqtt(monkeypatch)


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh real Mosquitto broker for one test."""
    if not mosquitto_binary():
        missing_service("mosquitto (apt-get install mosquitto)")
    broker = Mosquitto(tmp_path)
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


# --------------------------------------------------------------------------------------------------
# PostgreSQL


def pg_bin(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    cands = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return cands[-1] if cands else None


class Postgres:
    """A throwaway PostgreSQL cluster run as an unprivileged user (PostgreSQL refuses root)."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="edgefleet-pg-"))
        self.port = free_port()
        self.user = "nobody" if os.geteuid() == 0 else None
        os.chmod(self.dir, 0o777)
        self.data = self.dir / "data"

    def _run(self, args: list[str]) -> None:
        cmd = args if self.user is None else ["runuser", "-u", self.user, "--", *args]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd="/")

    def start(self) -> None:
        initdb, pg_ctl = pg_bin("initdb"), pg_bin("pg_ctl")
        assert initdb and pg_ctl
        self._run(
            [initdb, "-D", str(self.data), "-U", "edgefleet", "--auth=trust", "-E", "UTF8", "--no-sync"]
        )
        opts = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 -c fsync=off"
        self._run([pg_ctl, "-D", str(self.data), "-o", opts, "-l", str(self.dir / "pg.log"), "-w", "start"])
        wait_port(self.port)

    @property
    def url(self) -> str:
        return f"postgresql://edgefleet@127.0.0.1:{self.port}/postgres"

    def stop(self) -> None:
        pg_ctl = pg_bin("pg_ctl")
        if pg_ctl and self.data.exists():
            try:
                self._run([pg_ctl, "-D", str(self.data), "-m", "immediate", "stop"])
            except subprocess.CalledProcessError:
                pass
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Postgres]:
    """One real PostgreSQL server for the session."""
    if not pg_bin("initdb") or not pg_bin("pg_ctl"):
        missing_service("PostgreSQL server (apt-get install postgresql)")
    if os.geteuid() == 0 and not shutil.which("runuser"):
        missing_service("runuser (to run PostgreSQL unprivileged)")
    server = Postgres()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: Postgres) -> str:
    """A fresh, empty database on the session's server; returns its URL."""
    import uuid

    psycopg = pytest.importorskip("psycopg")
    name = "t_" + uuid.uuid4().hex[:12]
    with psycopg.connect(postgres_server.url, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return postgres_server.url.rsplit("/", 1)[0] + "/" + name


# --------------------------------------------------------------------------------------------------
# Chromium


@pytest.fixture(scope="session")
def chromium() -> str:
    """Path of a headless-capable Chromium."""
    path = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not path:
        missing_service("chromium (apt-get install chromium)")
    return str(path)


def render_page(chromium_path: str, html: Path, png: Path, width: int = 1280, height: int = 2000) -> str:
    """Render a local HTML file headless; return the DOM Chromium built (after scripts ran)."""
    profile = tempfile.mkdtemp(prefix="edgefleet-chromium-")
    flags = [
        chromium_path,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        f"--window-size={width},{height}",
    ]
    try:
        subprocess.run(
            [*flags, f"--screenshot={png}", html.as_uri()], check=True, capture_output=True, timeout=120
        )
        dom = subprocess.run(
            [*flags, "--dump-dom", html.as_uri()], check=True, capture_output=True, timeout=120
        )
        return dom.stdout.decode("utf-8", "replace")
    finally:
        shutil.rmtree(profile, ignore_errors=True)


# --------------------------------------------------------------------------------------------------
# Data


@pytest.fixture(scope="session")
def digits() -> dict[str, np.ndarray]:
    """The shipped digits split: x/y (train) and x_test/y_test."""
    tr = np.load(DATA / "digits.npz")
    te = np.load(DATA / "digits_test.npz")
    return {"x": tr["x"], "y": tr["y"], "x_test": te["x"], "y_test": te["y"]}


@pytest.fixture
def cli_env() -> dict[str, str]:
    """Environment for running the CLIs in a subprocess."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


PYTHON = sys.executable


# --------------------------------------------------------------------------------------------------
# Tiny trained model and its bundles (the build pipeline's Python API; TensorFlow, so use them in `slow` tests)

DIGITS_CNN_EPOCHS = 8


@pytest.fixture(scope="session")
def digits_cnn_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small tf_keras CNN (built-in ``cnn`` arch) trained a few epochs on the digits, saved as .keras."""
    from toolchain.steps.data import load_dataset
    from toolchain.steps.train import train_model

    path = tmp_path_factory.mktemp("digits-cnn") / "digits_cnn.keras"
    train_model(load_dataset(DATA / "digits.npz"), "cnn", DIGITS_CNN_EPOCHS, path, progress=False)
    return path


@pytest.fixture(scope="session")
def digits_bundles(digits_cnn_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A build of all four targets of ``digits_cnn_path`` (name ``digits_cnn``, version 1) with eval data.

    Returns the output folder: ``<dir>/{coral,mobile,raspberry-pi,x86}/`` bundles plus report.json/html.
    Treat it as read-only (copy a bundle before changing it).
    """
    from toolchain.build import build_bundles

    out = tmp_path_factory.mktemp("digits-bundles") / "bundles"
    build_bundles(
        digits_cnn_path,
        DATA / "digits.npz",
        ["all"],
        out,
        eval_data=DATA / "digits_test.npz",
        allow_accuracy_drop=True,
        progress=False,
    )
    return out
