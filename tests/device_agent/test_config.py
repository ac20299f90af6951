"""The agent's TOML config: the shipped example, strict keys, types, URLs, paths and file checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from device_agent.config import check_files, load_config, parse_config
from device_agent.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "device_agent" / "examples" / "agent.toml"
MIN = {
    "agent": {"device_id": "pi-1", "fleet": "lab", "bundle": "b", "state_dir": "s", "allow_unsigned": True}
}


def cfg(**sections: dict) -> dict:
    doc = {k: dict(v) for k, v in MIN.items()}
    for name, sec in sections.items():
        doc.setdefault(name, {}).update(sec)
    return doc


def test_example_config_parses_with_every_documented_key() -> None:
    c = load_config(EXAMPLE)
    assert (c.device_id, c.fleet) == ("pi-001", "lab")
    assert c.mqtt is not None and c.mqtt.tls and c.mqtt.port == 8883 and c.mqtt.username == "pi-001"
    assert c.window_s == 60 and c.outbox_max_rows == 10000 and c.listen == "127.0.0.1:8470"
    assert c.trusted_keys == (Path("/etc/edgefleet/keys/release.pub"),) and not c.allow_unsigned
    text = EXAMPLE.read_text()
    doc = (Path(__file__).resolve().parents[2] / "docs" / "agent.md").read_text()
    for key in (
        "device_id",
        "fleet",
        "bundle",
        "state_dir",
        "trusted_keys",
        "allow_unsigned",
        "url",
        "username",
        "password_file",
        "ca_file",
        "cert_file",
        "key_file",
        "window_s",
        "window_max_samples",
        "outbox_max_rows",
        "listen",
    ):
        assert key in text and f"`{key}`" in doc


def test_defaults_and_relative_paths(tmp_path: Path) -> None:
    c = parse_config(cfg(), base_dir=tmp_path)
    assert c.bundle == tmp_path / "b" and c.state_dir == tmp_path / "s"
    assert c.mqtt is None and c.window_s == 60.0 and c.listen == "127.0.0.1:8470"


@pytest.mark.parametrize(
    ("doc", "match"),
    [
        (cfg(agent={"colour": "red"}), r"unknown key\(s\) colour in \[agent\]"),
        ({**cfg(), "extras": {}}, r"unknown config section\(s\) \[extras\]"),
        ({"telemetry": {}}, r"no \[agent\] section"),
        (cfg(agent={"device_id": "Pi 1"}), "device_id 'Pi 1' is invalid"),
        (cfg(agent={"allow_unsigned": "yes"}), "allow_unsigned must be true/false"),
        (cfg(agent={"threads": True}), "threads must be an integer"),
        (cfg(agent={"runtime": "tensorflow"}), "runtime 'tensorflow' is unknown"),
        (cfg(telemetry={"window_s": 0}), "window_s must be between"),
        (cfg(telemetry={"outbox_max_rows": 0}), "outbox_max_rows must be >= 1"),
        (cfg(mqtt={"url": "http://broker"}), "must start with mqtt:// or mqtts://"),
        (cfg(mqtt={"url": "mqtt://u:p@broker"}), "must not hold credentials"),
        (cfg(mqtt={"url": "mqtt://broker", "ca_file": "ca.pem"}), "need a mqtts:// url"),
        (cfg(mqtt={"url": "mqtts://broker", "cert_file": "c.pem"}), "cert_file and key_file go together"),
        (cfg(mqtt={"url": "mqtt://broker", "password_file": "p"}), "password_file needs a username"),
        (cfg(mqtt={"username": "x"}), r"\[mqtt\] url is required"),
        (cfg(api={"listen": "8470"}), "must be HOST:PORT"),
        (cfg(api={"listen": "unix:relative.sock"}), "absolute path"),
    ],
)
def test_bad_configs_name_the_key(tmp_path: Path, doc: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config(doc, base_dir=tmp_path)


def test_mqtt_url_ports_and_unix_listen(tmp_path: Path) -> None:
    c = parse_config(
        cfg(mqtt={"url": "mqtt://broker.local"}, api={"listen": "unix:/run/a.sock"}), base_dir=tmp_path
    )
    assert c.mqtt is not None and c.mqtt.port == 1883 and not c.mqtt.tls and c.listen == "unix:/run/a.sock"
    c = parse_config(cfg(mqtt={"url": "mqtt://10.0.0.2:1999"}, api={"listen": "off"}), base_dir=tmp_path)
    assert c.mqtt is not None and c.mqtt.port == 1999 and c.listen is None


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[agent\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_check_files(tmp_path: Path) -> None:
    c = parse_config(cfg(agent={"allow_unsigned": False}), base_dir=tmp_path)
    with pytest.raises(ConfigError, match="trusted_keys is empty and allow_unsigned is false"):
        check_files(c)
    c = parse_config(cfg(agent={"trusted_keys": ["missing.pub"]}), base_dir=tmp_path)
    with pytest.raises(ConfigError, match="missing.pub"):
        check_files(c)
    c = parse_config(cfg(mqtt={"url": "mqtt://b", "username": "u", "password_file": "pw"}), base_dir=tmp_path)
    with pytest.raises(ConfigError, match="password_file"):
        check_files(c)
    (tmp_path / "pw").write_text("secret\n")
    assert check_files(c) == ()
    assert c.mqtt is not None and c.mqtt.password() == "secret"


def test_check_files_loads_pem_keys(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    key = Ed25519PrivateKey.generate().public_key()
    (tmp_path / "k.pub").write_bytes(key.public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo))
    c = parse_config(cfg(agent={"trusted_keys": ["k.pub"], "allow_unsigned": False}), base_dir=tmp_path)
    assert check_files(c) == (key.public_bytes(Encoding.Raw, PublicFormat.Raw),)
