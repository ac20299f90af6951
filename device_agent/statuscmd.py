"""``edgefleet-agent status``: ask the running agent (``GET /v1/health`` at ``[api] listen``) and show it.

The address and the bearer token come from the same ``agent.toml`` the daemon runs with: ``HOST:PORT``
(a wildcard host is asked on loopback) or ``unix:/path``. ``render`` turns the health document into a
few aligned lines for a terminal; ``--json`` prints the document itself.
"""

from __future__ import annotations

import http.client
import json
import socket
from typing import Any

from device_agent.config import AgentConfig, read_token
from device_agent.errors import AgentError

TIMEOUT_S = 5.0
HEALTH_MAX_BYTES = 4 * 1024 * 1024


class StatusError(AgentError):
    """The running agent cannot be asked (API off, unreachable, refused)."""


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self._path)
        except OSError:
            s.close()
            raise
        self.sock = s


def _connection(listen: str, timeout_s: float) -> tuple[http.client.HTTPConnection, str]:
    if listen.startswith("unix:"):
        return _UnixConnection(listen[5:], timeout_s), listen
    host, _, port = listen.rpartition(":")
    host = host.strip("[]")
    if int(port) == 0:
        raise StatusError(
            f"[api] listen {listen!r} picks a free port at start, so status cannot know it;"
            " set a fixed port (e.g. 127.0.0.1:8470)"
        )
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return http.client.HTTPConnection(host, int(port), timeout=timeout_s), f"{host}:{port}"


def fetch_health(cfg: AgentConfig, timeout_s: float = TIMEOUT_S) -> dict[str, Any]:
    """Return the running agent's ``/v1/health`` document, or raise StatusError saying why not."""
    if not cfg.listen:
        raise StatusError(
            "[api] listen is off in this config, so the running agent has no API to ask;"
            " set [api] listen (e.g. 127.0.0.1:8470) and restart the agent"
        )
    conn, where = _connection(cfg.listen, timeout_s)
    headers = {}
    if cfg.api.token_file is not None:
        headers["Authorization"] = f"Bearer {read_token(cfg.api.token_file)}"
    try:
        conn.request("GET", "/v1/health", headers=headers)
        resp = conn.getresponse()
        body = resp.read(HEALTH_MAX_BYTES)
    except (OSError, http.client.HTTPException) as e:
        why = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise StatusError(
            f"cannot reach the agent at {where} ({why}); is 'edgefleet-agent run' running?"
        ) from None
    finally:
        conn.close()
    if resp.status != 200:
        raise StatusError(
            f"the agent at {where} answered {resp.status}: {body[:200].decode(errors='replace')}"
        )
    try:
        doc = json.loads(body)
    except ValueError:
        raise StatusError(
            f"the agent at {where} did not answer JSON; is something else listening there?"
        ) from None
    if not isinstance(doc, dict):
        raise StatusError(f"the agent at {where} answered an unexpected document")
    return doc


def render(h: dict[str, Any]) -> str:
    """A few aligned lines: the device, its model, MQTT, outbox, capture and the fleet's alert command."""
    rows: list[tuple[str, str]] = []
    m = h.get("model") or {}
    rows.append(
        (
            "device",
            f"{h.get('fleet')}/{h.get('device_id')}, agent {h.get('agent_version')}, up {h.get('uptime_s', 0):.0f} s",
        )
    )
    rows.append(
        (
            "model",
            f"{m.get('name')} v{m.get('version')} ({m.get('runtime')}), sha256 {str(m.get('sha256'))[:12]}",
        )
    )
    q = h.get("mqtt") or {}
    if q.get("enabled"):
        state = "connected" if q.get("connected") else f"DISCONNECTED (last error: {q.get('last_error')})"
        rows.append(("mqtt", f"{state}, {q.get('url')}, {q.get('protocol')}"))
    else:
        rows.append(("mqtt", "off"))
    o = h.get("outbox") or {}
    rows.append(
        (
            "outbox",
            f"{o.get('rows')} window(s) waiting, {o.get('bytes')} bytes, {o.get('dropped_windows')} dropped",
        )
    )
    c = h.get("capture") or {}
    if c.get("enabled"):
        rows.append(
            (
                "capture",
                f"rate {c.get('rate')}, captured {c.get('captured')}, {c.get('pending_messages')} message(s)"
                f" waiting, {c.get('dropped_messages_disk_cap')} dropped at the disk cap",
            )
        )
    else:
        rows.append(("capture", "off"))
    a = h.get("alert_commands")
    if a is not None:
        state = "IN ALERT" if a.get("in_alert") else "not in alert"
        since = f" since {a['since']}" if a.get("since") else ""
        reason = f": {a['reason']}" if a.get("reason") else ""
        refused = a.get("refused") or {}
        by = ", ".join(f"{k} {v}" for k, v in refused.items())
        rows.append(("alert", f"{state}{since}{reason}"))
        rows.append(
            (
                "commands",
                f"applied {a.get('applied')}, duplicates {a.get('duplicates')},"
                f" refused {a.get('refused_total')} ({by})",
            )
        )
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
