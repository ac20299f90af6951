"""Fixtures for the OTA tests: signing keys and small signed bundles (v1, v2, ...)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.fabricate import fit_softmax, flat_onnx_bundle, onnx_dense, repackage
from tests.helpers import stop_process
from tests.ota.agent_proc import Agent, write_agent_config


@pytest.fixture(scope="session")
def ota_keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trusted key pair and a second, untrusted one."""
    from toolchain.shipping.signing import create_keys

    d = tmp_path_factory.mktemp("keys")
    priv, pub = create_keys(d, "fleet")
    other_priv, other_pub = create_keys(d, "other")
    return {"key": priv, "pub": pub, "other_key": other_priv, "other_pub": other_pub}


@pytest.fixture(scope="session")
def base_bundle(tmp_path_factory: pytest.TempPathFactory, digits: dict[str, np.ndarray]) -> Path:
    """An unsigned v1 x86 bundle with a real ONNX model trained on the digits."""
    w, b = fit_softmax(digits["x"], digits["y"])
    d = tmp_path_factory.mktemp("bundles") / "base"
    return flat_onnx_bundle(d, onnx_dense(w, b, ["n", w.shape[0]]), digits["x"][:300])


@pytest.fixture(scope="session")
def make_version(
    tmp_path_factory: pytest.TempPathFactory, base_bundle: Path, ota_keys: dict[str, Path]
) -> Callable[..., Path]:
    """Return ``make(version, key="key"|"other_key"|None, target=None, labels=None) -> bundle dir`` (fresh copy)."""
    root = tmp_path_factory.mktemp("versions")
    counter = [0]

    def make(
        version: int, key: str | None = "key", target: str | None = None, labels: list[str] | None = None
    ) -> Path:
        counter[0] += 1
        dst = root / f"v{version}-{counter[0]}"
        return repackage(
            base_bundle,
            dst,
            version=version,
            key=ota_keys[key] if key else None,
            target=target,
            labels=labels,
        )

    return make


# --------------------------------------------------------------------------------------------------
# A real sshd on 127.0.0.1 (Debian's openssh-server) with a generated host key and authorized_keys.


class Sshd:
    """An sshd on 127.0.0.1 that accepts one generated client key for the current user."""

    def __init__(self, root: Path) -> None:
        import pwd

        from tests.conftest import free_port

        self.root = root
        self.port = free_port()
        self.user = pwd.getpwuid(os.getuid()).pw_name
        self.client_key = root / "id_ed25519"
        self.known_hosts = root / "known_hosts"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def ssh_options(self) -> list[str]:
        """``ssh -o`` options a client needs for this server (key, known hosts file)."""
        return [
            f"IdentityFile={self.client_key}",
            "IdentitiesOnly=yes",
            f"UserKnownHostsFile={self.known_hosts}",
            "StrictHostKeyChecking=accept-new",
            "ConnectTimeout=10",
        ]

    def url(self, path: Path) -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}{path}"

    def start(self) -> None:
        from tests.conftest import wait_port

        keygen = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
        subprocess.run(
            [keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(self.root / "host_ed25519")], check=True
        )
        subprocess.run([keygen, "-q", "-t", "ed25519", "-N", "", "-f", str(self.client_key)], check=True)
        (self.root / "authorized_keys").write_text((self.root / "id_ed25519.pub").read_text())
        os.chmod(self.root / "authorized_keys", 0o600)
        conf = self.root / "sshd_config"
        conf.write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.root / 'host_ed25519'}\n"
            f"PidFile {self.root / 'sshd.pid'}\nAuthorizedKeysFile {self.root / 'authorized_keys'}\n"
            "PasswordAuthentication no\nKbdInteractiveAuthentication no\nPubkeyAuthentication yes\n"
            "PermitRootLogin prohibit-password\nStrictModes no\nUsePAM no\nLogLevel ERROR\n"
            f"Subsystem sftp {SFTP_SERVER}\n"  # scp speaks SFTP since OpenSSH 9.0, as Debian's default config allows
        )
        try:
            Path("/run/sshd").mkdir(exist_ok=True)  # privilege separation directory (when run as root)
        except PermissionError:
            pass
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=open(self.root / "sshd.log", "wb"),
        )
        wait_port(self.port)

    def stop(self) -> None:
        stop_process(self.proc)


SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
SFTP_SERVER = "/usr/lib/openssh/sftp-server"


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sshd]:
    """A real sshd for the session (skipped by hand, failed under ./run test when missing)."""
    from tests.conftest import missing_service

    if (
        not os.path.exists(SSHD)
        or not os.path.exists(SFTP_SERVER)
        or not shutil.which("ssh")
        or not shutil.which("scp")
    ):
        missing_service("sshd and ssh/scp (apt-get install openssh-server openssh-client)")
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    """Start agent processes (``start(config, name, pause_at)``); every one is stopped at the end."""
    started: list[Agent] = []

    def start(config: Path, name: str = "agent", pause_at: str | None = None) -> Agent:
        a = Agent(config, tmp_path / f"{name}-{len(started)}.log", pause_at)
        started.append(a)
        return a

    yield start
    for a in started:
        a.stop()


@pytest.fixture
def agent_v1(
    agents: Callable[..., Agent], make_version: Callable[..., Path], ota_keys: dict[str, Path], tmp_path: Path
) -> Callable[..., Agent]:
    """Start an agent serving signed v1 (``tmp_path/agent.toml``, state in ``tmp_path/state``); MQTT with a URL."""

    def start(mqtt_url: str | None = None) -> Agent:
        cfg = write_agent_config(
            tmp_path / "agent.toml",
            bundle=make_version(1),
            state_dir=tmp_path / "state",
            pub=ota_keys["pub"],
            mqtt_url=mqtt_url,
        )
        agent = agents(cfg)
        assert agent.model_version() == 1
        return agent

    return start
