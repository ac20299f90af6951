"""``edgefleet fleet broker-config``: a Mosquitto configuration that locks every device to its own topics.

What it writes into ``DIR`` (see docs/fleet.md, *Locking the broker down*):

* ``mosquitto.conf``: no anonymous clients, the password and ACL files below, persistence on (in
  ``DIR/data``), ``max_queued_messages`` sized for a day of windows of every device (so a collector
  that is down for a day loses nothing the broker acknowledged), ``max_packet_size`` matching the
  collector's payload limit, one listener (TLS when given certificate files);
* ``passwd``: Mosquitto's hashed password format (``$7$``: PBKDF2-HMAC-SHA512, 101 iterations, a
  12-byte random salt, as ``mosquitto_passwd`` writes it); never a plain-text password;
* ``acl``: each device may publish only ``edgefleet/<fleet>/<its id>/{stats,status,events,samples}`` and
  read its own command topics (``cmd`` and the retained ``cmd/alert``), the fleet-wide one and the
  bundle chunks; the collector user reads everything of the fleet (and ``$SYS``) and writes alerts,
  commands (each device's ``cmd/alert`` too) and bundle chunks;
* ``credentials.json`` (mode 0600) and one password file per user (0600): the collector's
  ``collector.password`` and ``agents/<id>.password``;
* ``agents/<id>.toml``: the ``[mqtt]`` section of that device's agent config.

Running it again keeps every existing user's password (and its hash line) and adds the new devices.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device_agent.formats.telemetry import DEFAULT_WINDOW_S, MAX_PAYLOAD_BYTES, TelemetryError, check_id
from toolchain.errors import ToolchainError

# Mosquitto's own password hashing parameters (mosquitto_passwd, 2.0): "$7$" = PBKDF2-HMAC-SHA512.
PBKDF2_ITERATIONS = 101
SALT_BYTES = 12
HASH_BYTES = 64
PASSWORD_BYTES = 24  # random bytes per generated password (32 URL-safe characters)
# Mosquitto's acl_file cannot tie a client id to a user: whoever connects with a client id that is in
# use takes its session over (and with clean start discards it). Unguessable client ids (devices have
# no $SYS access and cannot list them) keep one device from kicking another or the collector off.
CLIENT_ID_HEX = 8

COLLECTOR_USER = "edgefleet-collector"
SECONDS_PER_DAY = 86_400
# Status (online/offline, retained) and event messages travel the collector's queue beside the
# windows; 10 % on top of the windows covers them for a device that reconnects every few minutes.
QUEUE_MARGIN = 1.10
MOSQUITTO_DEFAULT_QUEUE = 1000  # never write less than Mosquitto's own default
# The fixed header (up to 5 bytes), the topic (2 + at most ~150 bytes for two 63-character ids), the
# packet id and MQTT 5 properties fit well within 1 KiB.
PACKET_OVERHEAD_BYTES = 1024
AUTOSAVE_INTERVAL_S = 60  # Mosquitto writes its in-memory state to disk this often (and on exit)
PERSISTENT_CLIENT_EXPIRATION = "7d"  # as long as the collector's own session expiry


class BrokerConfigError(ToolchainError):
    """The broker configuration cannot be written (bad id, a directory of another fleet, I/O)."""


def hash_password(password: str, salt: bytes | None = None) -> str:
    """Return ``$7$101$<salt b64>$<hash b64>``: Mosquitto's password_file hash of ``password``."""
    salt = secrets.token_bytes(SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, PBKDF2_ITERATIONS, HASH_BYTES)
    return (
        f"$7${PBKDF2_ITERATIONS}$"
        f"{base64.b64encode(salt).decode('ascii')}${base64.b64encode(digest).decode('ascii')}"
    )


def check_password(password: str, hashed: str) -> bool:
    """Tell whether ``hashed`` (a ``$7$`` or ``$6$`` password_file hash) is the hash of ``password``."""
    parts = hashed.split("$")
    try:
        if len(parts) == 5 and parts[1] == "7":
            iterations, salt, want = int(parts[2]), base64.b64decode(parts[3]), base64.b64decode(parts[4])
            got = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations, len(want))
        elif len(parts) == 4 and parts[1] == "6":  # Mosquitto 1.x: one round of salted SHA-512
            salt, want = base64.b64decode(parts[2]), base64.b64decode(parts[3])
            got = hashlib.sha512(password.encode("utf-8") + salt).digest()
        else:
            return False
    except ValueError:
        return False
    return hmac.compare_digest(got, want)


def queue_size(devices: int, window_s: float, days: float = 1.0) -> int:
    """Return ``max_queued_messages`` for ``days`` of windows of ``devices`` devices, with a 10 % margin.

    ``devices x ceil(86,400 / window_s) x days x 1.1``, and never less than Mosquitto's default 1000.
    """
    windows_per_day = math.ceil(SECONDS_PER_DAY / window_s)
    exact = round(devices * windows_per_day * days * QUEUE_MARGIN, 6)  # 3168.0000000000005 is 3168
    return max(MOSQUITTO_DEFAULT_QUEUE, math.ceil(exact))


def max_packet_size() -> int:
    """Return the broker's ``max_packet_size``: the packet limit the collector announces on connect.

    It sits above the stats payload limit (MAX_PAYLOAD_BYTES) so that a payload just over it still
    reaches the collector, which quarantines and counts it; anything larger stops at the broker.
    """
    from toolchain.fleet.quarantine import MAX_PACKET_BYTES

    return max(MAX_PACKET_BYTES, MAX_PAYLOAD_BYTES + PACKET_OVERHEAD_BYTES)


@dataclass(frozen=True)
class Tls:
    """Certificate files of the broker's TLS listener (absolute paths)."""

    cafile: Path
    certfile: Path
    keyfile: Path


@dataclass(frozen=True)
class BrokerConfig:
    """What ``write_broker_config`` wrote: the directory, the users and the sizing it chose."""

    out: Path
    fleet: str
    devices: tuple[str, ...]
    added: tuple[str, ...]
    port: int
    max_queued_messages: int
    max_packet_size: int
    window_s: float
    days: float
    collector_client_id: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "fleet": self.fleet,
            "collector_user": COLLECTOR_USER,
            "collector_client_id": self.collector_client_id,
            "devices": list(self.devices),
            "added": list(self.added),
            "port": self.port,
            "max_queued_messages": self.max_queued_messages,
            "max_packet_size": self.max_packet_size,
            "window_s": self.window_s,
            "days": self.days,
        }


def _write_private(path: Path, text: str, mode: int = 0o600) -> None:
    """Write ``text`` to ``path`` atomically with ``mode`` set before any byte is written."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)  # O_CREAT's mode is filtered by the umask; fchmod is not
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def _account(user: str) -> tuple[int, int]:
    """Return (uid, gid) of ``user``, the account Mosquitto switches to when started as root."""
    import pwd

    try:
        pw = pwd.getpwnam(user)
    except KeyError:
        raise BrokerConfigError(
            f"--run-as {user!r} is not a user on this host; create it or pick another"
        ) from None
    return pw.pw_uid, pw.pw_gid


def _make_dir(path: Path, mode: int) -> None:
    """Create ``path`` with exactly ``mode``; refuse an existing one that group or others may write."""
    if path.is_dir():
        have = stat.S_IMODE(path.stat().st_mode)
        if have & 0o022:
            raise BrokerConfigError(
                f"{str(path)!r} is writable by group or others (mode {have:04o}), so anyone could change"
                f" the broker's files; run 'chmod {mode:o} {path}' or choose another --out"
            )
        return
    path.mkdir(parents=True, mode=mode)
    os.chmod(path, mode)  # mkdir's mode is filtered by the umask


def _read_credentials(path: Path, fleet: str) -> dict[str, Any]:
    if not path.exists():
        return {"fleet": fleet, "collector": None, "devices": {}}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BrokerConfigError(
            f"cannot read {str(path)!r} ({e}); restore it or choose an empty --out"
        ) from None
    if not isinstance(data, dict) or not isinstance(data.get("devices"), dict):
        raise BrokerConfigError(f"{str(path)!r} is not a credentials file written by broker-config")
    if data.get("fleet", fleet) != fleet:
        raise BrokerConfigError(
            f"{str(path.parent)!r} holds the broker config of fleet {data.get('fleet')!r}, not {fleet!r};"
            " use one --out per fleet"
        )
    return data


def _read_hashes(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            user, sep, hashed = line.partition(":")
            if sep:
                out[user] = hashed
    return out


def _acl_text(fleet: str, devices: list[str]) -> str:
    root = f"edgefleet/{fleet}"
    lines = [
        f"# edgefleet fleet broker-config: topic rules of fleet {fleet!r}. Regenerated on every run.",
        "# Nothing is allowed that is not listed here (Mosquitto's acl_file is allow-list only).",
        "",
        "# The collector (and the operator's flash / fleet deploy): reads the whole fleet and $SYS,",
        "# writes alerts, commands and bundle chunks. It never writes a device's telemetry topics.",
        f"user {COLLECTOR_USER}",
        f"topic read {root}/#",
        f"topic write {root}/alerts",
        f"topic write {root}/cmd",
        f"topic write {root}/+/cmd",
        f"topic write {root}/+/cmd/alert",
        f"topic write {root}/bundles/#",
        "topic read $SYS/#",
    ]
    for d in devices:
        lines += [
            "",
            f"# device {d}: its own telemetry, its own and the fleet's commands, bundle chunks",
            f"user {d}",
            f"topic write {root}/{d}/stats",
            f"topic write {root}/{d}/status",
            f"topic write {root}/{d}/events",
            f"topic write {root}/{d}/samples",  # [capture]: captured inputs and their labels
            f"topic read {root}/{d}/cmd",
            f"topic read {root}/{d}/cmd/alert",
            f"topic read {root}/cmd",
            f"topic read {root}/bundles/#",
        ]
    return "\n".join(lines) + "\n"


def _conf_text(
    out: Path,
    fleet: str,
    n_devices: int,
    port: int,
    bind: str | None,
    tls: Tls | None,
    run_as: str | None,
    window_s: float,
    days: float,
) -> tuple[str, int]:
    queue = queue_size(n_devices, window_s, days)
    windows_per_day = math.ceil(SECONDS_PER_DAY / window_s)
    lines = [
        f"# edgefleet fleet broker-config: Mosquitto 2.x broker of fleet {fleet!r}. Regenerated on every",
        "# run; reload with SIGHUP (passwords, ACLs and limits) or restart.",
        "",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {out / 'passwd'}",
        f"acl_file {out / 'acl'}",
        "",
        "# Durable sessions: the collector's persistent session and its queued windows survive a broker",
        f"# restart. Mosquitto writes its state to disk every {AUTOSAVE_INTERVAL_S} s and on a clean stop;",
        "# a crash of the broker (or its host) loses what arrived since the last save.",
        "persistence true",
        f"persistence_location {out / 'data'}/",
        f"autosave_interval {AUTOSAVE_INTERVAL_S}",
        f"persistent_client_expiration {PERSISTENT_CLIENT_EXPIRATION}",
        "",
        "# Queue of an offline persistent session (the collector's): Mosquitto drops what does not fit",
        "# AFTER it acknowledged it to the device. Sized for",
        f"#   {n_devices} devices x {windows_per_day} windows a day (one per {window_s:g} s) x {days:g} day(s)"
        f" x {QUEUE_MARGIN:g} (status, events)",
        "# Memory: up to this many messages of typically 4-12 KB each.",
        f"max_queued_messages {queue}",
        "",
        f"# The collector quarantines stats payloads above {MAX_PAYLOAD_BYTES} bytes and announces this"
        " packet limit on connect;",
        "# larger packets stop here: a client that sends one is disconnected.",
        f"max_packet_size {max_packet_size()}",
        "",
        "# $SYS/broker/publish/messages/dropped and friends, every 10 s (the collector watches them).",
        "sys_interval 10",
    ]
    if run_as:
        lines += ["", f"user {run_as}"]
    lines += ["", f"listener {port}" + (f" {bind}" if bind else "")]
    if tls is not None:
        lines += [
            f"cafile {tls.cafile}",
            f"certfile {tls.certfile}",
            f"keyfile {tls.keyfile}",
            "tls_version tlsv1.2",
        ]
    return "\n".join(lines) + "\n", queue


def _agent_snippet(fleet: str, entry: dict[str, str], url: str, tls: Tls | None) -> str:
    device = entry["username"]
    lines = [
        f"# [mqtt] section of device {device!r} in fleet {fleet!r} (edgefleet fleet broker-config).",
        f"# Copy {device}.password next to the device's agent.toml (mode 0600)"
        + (f" and the CA certificate {tls.cafile.name}." if tls else "."),
        "# Relative paths are read from the agent.toml's folder.",
        "[mqtt]",
        f'url = "{url}"',
        f'username = "{device}"',
        f'password_file = "{device}.password"',
        f'client_id = "{entry["client_id"]}"',
    ]
    if tls is not None:
        lines.append(f'ca_file = "{tls.cafile.name}"')
    return "\n".join(lines) + "\n"


def write_broker_config(
    out_dir: str | os.PathLike[str],
    fleet: str,
    devices: list[str] | tuple[str, ...],
    port: int | None = None,
    host: str = "localhost",
    bind: str | None = None,
    tls: Tls | None = None,
    run_as: str | None = None,
    window_s: float = DEFAULT_WINDOW_S,
    days: float = 1.0,
) -> BrokerConfig:
    """Write (or extend) the broker configuration of ``fleet`` in ``out_dir``; see the module docstring.

    ``host`` is the name devices reach the broker by (it goes into the agent snippets); ``bind`` the
    address the listener binds (all interfaces by default). Existing users keep their passwords.
    """
    try:
        check_id(fleet, "fleet")
        for d in devices:
            check_id(d, "device id")
    except TelemetryError as e:
        raise BrokerConfigError(str(e)) from None
    if COLLECTOR_USER in devices:
        raise BrokerConfigError(
            f"device id {COLLECTOR_USER!r} is the collector's user name; rename the device"
        )
    if not window_s > 0 or not days > 0:
        raise BrokerConfigError("--window-s and --days must be greater than 0")
    if tls is not None:
        for f in (tls.cafile, tls.certfile, tls.keyfile):
            if not f.is_file():
                raise BrokerConfigError(f"TLS file {str(f)!r} does not exist; pass an existing file")
    port = port if port is not None else (8883 if tls else 1883)
    owner = _account(run_as) if run_as and os.geteuid() == 0 else None
    out = Path(out_dir).resolve()
    try:
        # 0755: Mosquitto, switched to its own user, must enter the folder; nobody else may write it.
        _make_dir(out, 0o755)
        _make_dir(out / "data", 0o700)
        _make_dir(out / "agents", 0o755)
        creds_path = out / "credentials.json"
        creds = _read_credentials(creds_path, fleet)
        known: dict[str, Any] = creds["devices"]
        added = tuple(d for d in dict.fromkeys(devices) if d not in known)
        if not creds.get("collector"):
            creds["collector"] = {
                "username": COLLECTOR_USER,
                "password": secrets.token_urlsafe(PASSWORD_BYTES),
            }
        creds["collector"].setdefault("client_id", f"{COLLECTOR_USER}-{secrets.token_hex(CLIENT_ID_HEX)}")
        for d in added:
            known[d] = {"username": d, "password": secrets.token_urlsafe(PASSWORD_BYTES)}
        for d, entry in known.items():
            entry.setdefault("client_id", f"edgefleet-{d}-{secrets.token_hex(CLIENT_ID_HEX)}")
        creds["fleet"] = fleet
        all_devices = sorted(known)

        old_hashes = _read_hashes(out / "passwd")
        users = [creds["collector"]] + [known[d] for d in all_devices]
        passwd_lines = []
        for u in users:
            old = old_hashes.get(u["username"])
            hashed = old if old and check_password(u["password"], old) else hash_password(u["password"])
            passwd_lines.append(f"{u['username']}:{hashed}")

        # Secrets first, so the broker never reads a passwd that credentials.json does not explain.
        _write_private(creds_path, json.dumps(creds, indent=2, sort_keys=True) + "\n")
        _write_private(out / "collector.password", creds["collector"]["password"] + "\n")
        _write_private(out / "passwd", "\n".join(passwd_lines) + "\n")
        _write_private(out / "acl", _acl_text(fleet, all_devices), 0o644)
        conf, queue = _conf_text(out, fleet, len(all_devices), port, bind, tls, run_as, window_s, days)
        _write_private(out / "mosquitto.conf", conf, 0o644)
        if owner is not None:  # Mosquitto reads these after it switched to that user
            for p in (out / "passwd", out / "acl", out / "data"):
                os.chown(p, *owner)
        url = f"{'mqtts' if tls else 'mqtt'}://{host}:{port}"
        for d in all_devices:
            _write_private(out / "agents" / f"{d}.password", known[d]["password"] + "\n")
            _write_private(out / "agents" / f"{d}.toml", _agent_snippet(fleet, known[d], url, tls), 0o644)
    except OSError as e:
        raise BrokerConfigError(
            f"cannot write the broker config to {str(out)!r} ({e.strerror}); choose a writable --out"
        ) from None
    return BrokerConfig(
        out=out,
        fleet=fleet,
        devices=tuple(all_devices),
        added=added,
        port=port,
        max_queued_messages=queue,
        max_packet_size=max_packet_size(),
        window_s=window_s,
        days=days,
        collector_client_id=creds["collector"]["client_id"],
    )
