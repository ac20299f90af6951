"""The agent's TOML configuration: strict schema (unknown keys are errors), defaults, file checks.

Relative paths in the file are resolved against the directory of the config file, so a config and
its bundle/keys can travel together. Every error is a ``ConfigError`` naming the key, the value and
the fix; the daemon exits 78 (EX_CONFIG) on it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from device_agent.errors import ConfigError
from device_agent.formats.broker import BrokerSettings
from device_agent.formats.files import FileTooLargeError, read_bounded
from device_agent.formats.strict import check_keys
from device_agent.formats.telemetry import DEFAULT_WINDOW_S

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

CONFIG_MAX_BYTES = 256 * 1024
DEFAULT_LISTEN = "127.0.0.1:8470"
DEFAULT_WINDOW_MAX_SAMPLES = 100_000
DEFAULT_OUTBOX_MAX_ROWS = 10_000
DEFAULT_OUTBOX_MAX_BYTES = 64 * 1024 * 1024
RUNTIMES = ("litert", "onnxruntime", "openvino")
TOKEN_MAX_BYTES = 4096


@dataclass(frozen=True)
class ApiSettings:
    """Bounds and access control of the local HTTP API (``[api]``); see docs/agent.md."""

    workers: int = 4  # request worker threads (a fixed pool: idle or slow clients hold none)
    max_connections: int = 1024  # open connections; beyond, the oldest idle one is closed, else 503
    backlog: int = 128  # listen(2) backlog
    request_timeout_s: float = 10.0  # a request must arrive completely within this (else 408)
    idle_timeout_s: float = 60.0  # a keep-alive connection with no request for this long is closed
    max_body_bytes: int = 16 * 1024 * 1024  # cap on the body limit sized from the model's input
    max_batch: int = 256  # samples per request the body limit is sized for
    max_json_depth: int = 32  # nesting of a JSON body (400 beyond)
    buffer_bytes: int = (
        64 * 1024 * 1024
    )  # request bodies held in memory at once, all connections (503 beyond)
    token_file: Path | None = None  # bearer token required on every request when set
    feedback_max_ids: int = 10_000  # recent prediction ids /v1/feedback can label (older ones: 409)


# [api] key -> (type, minimum, maximum)
API_LIMITS: dict[str, tuple[type, float, float]] = {
    "workers": (int, 1, 64),
    "max_connections": (int, 8, 65536),
    "backlog": (int, 64, 65535),
    "request_timeout_s": (float, 0.1, 3600),
    "idle_timeout_s": (float, 0.1, 86400),
    "max_body_bytes": (int, 1024, 1 << 30),
    "max_batch": (int, 1, 1_000_000),
    "max_json_depth": (int, 2, 1000),
    "buffer_bytes": (int, 1 << 20, 1 << 34),
    "feedback_max_ids": (int, 16, 10_000_000),
}


@dataclass(frozen=True)
class MqttSettings:
    """Where and how the agent publishes telemetry."""

    url: str
    host: str
    port: int
    tls: bool
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    client_id: str | None = None
    keepalive_s: int = 30

    def password(self) -> str | None:
        """Read the password file (stripped of its trailing newline), or None without one."""
        if self.password_file is None:
            return None
        try:
            return self.password_file.read_text(encoding="utf-8").rstrip("\r\n")
        except OSError as e:
            raise ConfigError(
                f"[mqtt] password_file {str(self.password_file)!r} cannot be read ({e.strerror})"
            ) from None

    @property
    def safe_url(self) -> str:
        """The URL without credentials, for logs and /v1/health."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def broker_settings(m: MqttSettings, client_id: str | None = None) -> BrokerSettings:
    """The connection settings of ``[mqtt]`` (password read from its file now); ``client_id`` overrides."""
    return BrokerSettings(
        host=m.host,
        port=m.port,
        username=m.username,
        password=m.password() if m.username is not None else None,
        tls=m.tls,
        ca_file=str(m.ca_file) if m.ca_file else None,
        cert_file=str(m.cert_file) if m.cert_file else None,
        key_file=str(m.key_file) if m.key_file else None,
        client_id=client_id if client_id is not None else m.client_id,
    )


@dataclass(frozen=True)
class CaptureSettings:
    """``[capture]``: which raw inputs leave the device. Off by default (both rates 0)."""

    sample_rate: float = 0.0
    on_alert_rate: float = 0.0  # used while the fleet has told this device it is in alert
    max_samples_per_hour: int = 600
    max_disk_bytes: int = 16 * 1024 * 1024

    @property
    def enabled(self) -> bool:
        return self.sample_rate > 0 or self.on_alert_rate > 0


def _parse_capture(sec: dict[str, Any] | None) -> CaptureSettings:
    if sec is None:
        return CaptureSettings()
    d = CaptureSettings()
    rate = float(sec.get("sample_rate", d.sample_rate))
    alert = float(sec.get("on_alert_rate", d.on_alert_rate))
    for key, v in (("sample_rate", rate), ("on_alert_rate", alert)):
        if not 0.0 <= v <= 1.0:
            raise ConfigError(f"[capture] {key} must be between 0 and 1, got {v}")
    per_hour = sec.get("max_samples_per_hour", d.max_samples_per_hour)
    if per_hour < 1:
        raise ConfigError(f"[capture] max_samples_per_hour must be >= 1, got {per_hour}")
    disk = sec.get("max_disk_bytes", d.max_disk_bytes)
    if disk < 64 * 1024:
        raise ConfigError(f"[capture] max_disk_bytes must be >= 65536, got {disk}")
    return CaptureSettings(rate, alert, int(per_hour), int(disk))


@dataclass(frozen=True)
class AgentConfig:
    """A validated agent configuration."""

    path: Path | None
    device_id: str
    fleet: str
    bundle: Path
    state_dir: Path
    trusted_keys: tuple[Path, ...] = ()
    allow_unsigned: bool = False
    runtime: str | None = None
    threads: int | None = None
    target: str | None = None
    mqtt: MqttSettings | None = None
    window_s: float = DEFAULT_WINDOW_S
    window_max_samples: int = DEFAULT_WINDOW_MAX_SAMPLES
    outbox_max_rows: int = DEFAULT_OUTBOX_MAX_ROWS
    outbox_max_bytes: int = DEFAULT_OUTBOX_MAX_BYTES
    listen: str | None = DEFAULT_LISTEN
    api: ApiSettings = field(default_factory=ApiSettings)
    capture: CaptureSettings = field(default_factory=CaptureSettings)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def outbox_path(self) -> Path:
        return self.state_dir / "outbox.sqlite3"


# section -> {key: (required, python types)}
SCHEMA: dict[str, dict[str, tuple[bool, tuple[type, ...]]]] = {
    "agent": {
        "device_id": (True, (str,)),
        "fleet": (True, (str,)),
        "bundle": (True, (str,)),
        "state_dir": (True, (str,)),
        "trusted_keys": (False, (list,)),
        "allow_unsigned": (False, (bool,)),
        "runtime": (False, (str,)),
        "threads": (False, (int,)),
        "target": (False, (str,)),
    },
    "mqtt": {
        "url": (True, (str,)),
        "username": (False, (str,)),
        "password_file": (False, (str,)),
        "ca_file": (False, (str,)),
        "cert_file": (False, (str,)),
        "key_file": (False, (str,)),
        "client_id": (False, (str,)),
        "keepalive_s": (False, (int,)),
    },
    "telemetry": {
        "window_s": (False, (int, float)),
        "window_max_samples": (False, (int,)),
        "outbox_max_rows": (False, (int,)),
        "outbox_max_bytes": (False, (int,)),
    },
    "api": {
        "listen": (False, (str,)),
        "workers": (False, (int,)),
        "max_connections": (False, (int,)),
        "backlog": (False, (int,)),
        "request_timeout_s": (False, (int, float)),
        "idle_timeout_s": (False, (int, float)),
        "max_body_bytes": (False, (int,)),
        "max_batch": (False, (int,)),
        "max_json_depth": (False, (int,)),
        "buffer_bytes": (False, (int,)),
        "feedback_max_ids": (False, (int,)),
        "token_file": (False, (str,)),
    },
    "capture": {  # opt-in sample capture; off unless sample_rate or on_alert_rate > 0
        "sample_rate": (False, (int, float)),
        "on_alert_rate": (False, (int, float)),
        "max_samples_per_hour": (False, (int,)),
        "max_disk_bytes": (False, (int,)),
    },
    "update": {  # over-the-air updates; validated further by device_agent.update.parse_update_section
        "health_window_s": (False, (int, float)),
        "max_bundle_bytes": (False, (int,)),
        "staging_quota_bytes": (False, (int,)),
        "ca_file": (False, (str,)),
    },
}
REQUIRED_SECTIONS = ("agent",)


def load_config(path: str | os.PathLike[str]) -> AgentConfig:
    """Read and validate a TOML config file."""
    p = Path(path)
    try:
        raw = read_bounded(p, CONFIG_MAX_BYTES)
    except FileTooLargeError:
        raise ConfigError(
            f"config {str(p)!r} is larger than {CONFIG_MAX_BYTES} bytes; is it the right file?"
        ) from None
    except FileNotFoundError:
        raise ConfigError(
            f"config file {str(p)!r} does not exist; start from device_agent/examples/agent.toml"
        ) from None
    except OSError as e:
        raise ConfigError(f"cannot read config {str(p)!r} ({e.strerror})") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"config {str(p)!r} is not valid TOML: {e}") from None
    return parse_config(doc, base_dir=p.resolve().parent, path=p)


def parse_config(doc: dict[str, Any], base_dir: Path, path: Path | None = None) -> AgentConfig:
    """Validate a parsed TOML document; relative paths resolve against ``base_dir``."""
    unknown = set(doc) - set(SCHEMA)
    if unknown:
        raise ConfigError(
            f"unknown config section(s) {', '.join(f'[{s}]' for s in sorted(unknown))}. Known: "
            + ", ".join(f"[{s}]" for s in SCHEMA)
        )
    for s in REQUIRED_SECTIONS:
        if s not in doc:
            raise ConfigError(f"config has no [{s}] section; see device_agent/examples/agent.toml")
    sections: dict[str, dict[str, Any]] = {}
    for name, spec in SCHEMA.items():
        sec = doc.get(name)
        if sec is None:
            continue
        if not isinstance(sec, dict):
            raise ConfigError(f"[{name}] must be a table")
        check_table(sec, spec, name)  # required keys are named one by one below
        for key, (required, types) in spec.items():
            if key not in sec:
                if required:
                    raise ConfigError(f"[{name}] {key} is required")
                continue
            v = sec[key]
            if isinstance(v, bool) and bool not in types:
                raise ConfigError(f"[{name}] {key} must be {_type_names(types)}, got {v!r}")
            if not isinstance(v, types):
                raise ConfigError(f"[{name}] {key} must be {_type_names(types)}, got {str(v)[:60]!r}")
        sections[name] = sec

    from device_agent.formats.telemetry import TelemetryError, check_id

    a = sections["agent"]
    try:
        device_id = check_id(a["device_id"], "[agent] device_id")
        fleet = check_id(a["fleet"], "[agent] fleet")
    except TelemetryError as e:
        raise ConfigError(str(e)) from None

    def rel(v: str) -> Path:
        if not v:
            raise ConfigError("an empty path in the config; give a file or directory path")
        q = Path(os.path.expanduser(v))
        return q if q.is_absolute() else base_dir / q

    keys = a.get("trusted_keys", [])
    if not all(isinstance(k, str) for k in keys):
        raise ConfigError("[agent] trusted_keys must be a list of paths to .pub files")
    runtime = a.get("runtime")
    if runtime is not None and runtime not in RUNTIMES:
        raise ConfigError(f"[agent] runtime {runtime!r} is unknown. Known: {', '.join(RUNTIMES)}")
    threads = a.get("threads")
    if threads is not None and not 1 <= threads <= 64:
        raise ConfigError(f"[agent] threads must be between 1 and 64, got {threads}")

    t = sections.get("telemetry", {})
    window_s = float(t.get("window_s", DEFAULT_WINDOW_S))
    if not 0.05 <= window_s <= 86400:
        raise ConfigError(f"[telemetry] window_s must be between 0.05 and 86400 seconds, got {window_s}")
    wmax = t.get("window_max_samples", DEFAULT_WINDOW_MAX_SAMPLES)
    rows = t.get("outbox_max_rows", DEFAULT_OUTBOX_MAX_ROWS)
    nbytes = t.get("outbox_max_bytes", DEFAULT_OUTBOX_MAX_BYTES)
    for key, v, lo in (
        ("window_max_samples", wmax, 1),
        ("outbox_max_rows", rows, 1),
        ("outbox_max_bytes", nbytes, 1024),
    ):
        if v < lo:
            raise ConfigError(f"[telemetry] {key} must be >= {lo}, got {v}")

    api_sec = sections.get("api", {})
    listen = parse_listen(api_sec.get("listen", DEFAULT_LISTEN))
    api = _parse_api(api_sec, rel)

    mqtt = None
    if "mqtt" in sections:
        mqtt = _parse_mqtt(sections["mqtt"], rel, device_id)

    return AgentConfig(
        path=path,
        device_id=device_id,
        fleet=fleet,
        bundle=rel(a["bundle"]),
        state_dir=rel(a["state_dir"]),
        trusted_keys=tuple(rel(k) for k in keys),
        allow_unsigned=bool(a.get("allow_unsigned", False)),
        runtime=runtime,
        threads=threads,
        target=a.get("target"),
        mqtt=mqtt,
        window_s=window_s,
        window_max_samples=int(wmax),
        outbox_max_rows=int(rows),
        outbox_max_bytes=int(nbytes),
        listen=listen,
        api=api,
        capture=_parse_capture(sections.get("capture")),
        extra={"update": _parse_update(sections.get("update"), rel)},
    )


def _parse_update(sec: dict[str, Any] | None, rel: Any) -> dict[str, Any]:
    from device_agent.update import parse_update_section

    if sec is not None and isinstance(sec.get("ca_file"), str):
        sec = dict(sec, ca_file=str(rel(sec["ca_file"])))
    return parse_update_section(sec)


def _parse_api(sec: dict[str, Any], rel: Any) -> ApiSettings:
    values: dict[str, Any] = {}
    for key, (kind, lo, hi) in API_LIMITS.items():
        if key not in sec:
            continue
        v = sec[key]
        if not lo <= v <= hi:
            raise ConfigError(f"[api] {key} must be between {lo:g} and {hi:g}, got {v}")
        values[key] = kind(v)
    if "token_file" in sec:
        values["token_file"] = rel(sec["token_file"])
    return ApiSettings(**values)


def read_token(path: Path) -> str:
    """Read the API's bearer token (trailing newline ignored); ConfigError when missing, empty or exposed."""
    try:
        raw = read_bounded(path, TOKEN_MAX_BYTES)
        st = path.stat()
    except FileTooLargeError:
        raise ConfigError(f"[api] token_file {str(path)!r} is larger than {TOKEN_MAX_BYTES} bytes") from None
    except OSError as e:
        raise ConfigError(f"[api] token_file {str(path)!r} cannot be read ({e.strerror})") from None
    if st.st_mode & 0o004:
        raise ConfigError(
            f"[api] token_file {str(path)!r} is readable by every user; run: chmod 600 {str(path)!r}"
        )
    try:
        token = raw.decode("ascii").rstrip("\r\n")
    except UnicodeDecodeError:
        raise ConfigError(f"[api] token_file {str(path)!r} must hold an ASCII token") from None
    if len(token) < 16 or any(c.isspace() or not c.isprintable() for c in token):
        raise ConfigError(
            f"[api] token_file {str(path)!r} must hold one token of at least 16 printable characters"
            " without spaces, e.g. from: python -c 'import secrets; print(secrets.token_urlsafe(32))'"
        )
    return token


def parse_listen(value: str) -> str | None:
    """Validate ``[api] listen``: ``HOST:PORT``, ``unix:/path`` or ``off``; return None for ``off``."""
    if value == "off":
        return None
    if value.startswith("unix:"):
        if not value[5:].startswith("/"):
            raise ConfigError(
                f"[api] listen {value!r}: a Unix socket needs an absolute path,"
                " e.g. unix:/run/edgefleet/api.sock"
            )
        return value
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(
            f"[api] listen {value!r} must be HOST:PORT (e.g. {DEFAULT_LISTEN}), unix:/path or off"
        )
    return value


def _parse_mqtt(m: dict[str, Any], rel: Any, device_id: str) -> MqttSettings:
    url = m["url"]
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ConfigError(f"[mqtt] url {url!r} must start with mqtt:// or mqtts:// (TLS)")
    if parts.username or parts.password:
        raise ConfigError("[mqtt] url must not hold credentials; use username and password_file")
    if parts.path not in ("", "/") or parts.query:
        raise ConfigError(f"[mqtt] url {url!r} must be mqtt[s]://HOST[:PORT] without a path")
    try:
        port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
    except ValueError:
        raise ConfigError(f"[mqtt] url {url!r} has an invalid port") from None
    if not parts.hostname:
        raise ConfigError(f"[mqtt] url {url!r} has no host")
    tls = parts.scheme == "mqtts"
    files = {k: rel(m[k]) if k in m else None for k in ("password_file", "ca_file", "cert_file", "key_file")}
    if not tls and any(files[k] for k in ("ca_file", "cert_file", "key_file")):
        raise ConfigError("[mqtt] ca_file/cert_file/key_file need a mqtts:// url")
    if (files["cert_file"] is None) != (files["key_file"] is None):
        raise ConfigError("[mqtt] cert_file and key_file go together (client certificate and its key)")
    if files["password_file"] is not None and "username" not in m:
        raise ConfigError("[mqtt] password_file needs a username")
    keepalive = m.get("keepalive_s", 30)
    if not 5 <= keepalive <= 3600:
        raise ConfigError(f"[mqtt] keepalive_s must be between 5 and 3600, got {keepalive}")
    client_id = m.get("client_id") or f"edgefleet-{device_id}"
    if len(client_id) > 128:
        raise ConfigError("[mqtt] client_id must be at most 128 characters")
    return MqttSettings(
        url=url,
        host=parts.hostname,
        port=port,
        tls=tls,
        username=m.get("username"),
        password_file=files["password_file"],
        ca_file=files["ca_file"],
        cert_file=files["cert_file"],
        key_file=files["key_file"],
        client_id=client_id,
        keepalive_s=keepalive,
    )


def check_files(cfg: AgentConfig) -> tuple[bytes, ...]:
    """Check every file the config names (keys, TLS files, password, state dir); return the trusted keys."""
    from device_agent.formats.keys import KeyFileError, load_trusted_keys

    try:
        keys = load_trusted_keys(cfg.trusted_keys)
    except KeyFileError as e:
        raise ConfigError(f"[agent] trusted_keys: {e}") from None
    if not keys and not cfg.allow_unsigned:
        raise ConfigError(
            "[agent] trusted_keys is empty and allow_unsigned is false:"
            " list the .pub file(s) of your signing key,"
            " or set allow_unsigned = true for unsigned bundles"
        )
    if cfg.mqtt is not None:
        for key in ("password_file", "ca_file", "cert_file", "key_file"):
            f = getattr(cfg.mqtt, key)
            if f is not None and not f.is_file():
                raise ConfigError(f"[mqtt] {key} {str(f)!r} does not exist or is not a file")
        cfg.mqtt.password()
    sd = cfg.state_dir
    if sd.exists() and not sd.is_dir():
        raise ConfigError(f"[agent] state_dir {str(sd)!r} exists and is not a directory")
    if not sd.exists():
        parent = next((q for q in sd.parents if q.exists()), None)
        if parent is None or not os.access(parent, os.W_OK):
            raise ConfigError(
                f"[agent] state_dir {str(sd)!r} cannot be created; create it or choose a writable path"
            )
    elif not os.access(sd, os.W_OK):
        raise ConfigError(f"[agent] state_dir {str(sd)!r} is not writable by this user")
    if cfg.api.token_file is not None:
        read_token(cfg.api.token_file)
    if cfg.listen and cfg.listen.startswith("unix:"):
        d = Path(cfg.listen[5:]).parent
        if not d.is_dir():
            raise ConfigError(f"[api] listen: directory {str(d)!r} of the Unix socket does not exist")
    return keys


def check_table(sec: Any, known: Iterable[str], name: str) -> None:
    """Refuse a TOML table that is not one or holds a key outside ``known`` (ConfigError naming them)."""
    check_keys(
        sec,
        (),
        known,
        name,
        error=ConfigError,
        unknown="unknown key(s) {extra_names} in [{where}]. Known: {known}",
        not_mapping="[{where}] must be a table",
    )


def _type_names(types: tuple[type, ...]) -> str:
    names = {bool: "true/false", int: "an integer", float: "a number", str: "a string", list: "a list"}
    return " or ".join(names.get(t, t.__name__) for t in types)
