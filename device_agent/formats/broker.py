"""MQTT connection settings and the one paho-mqtt 2 client factory (auth, TLS, protocol version).

The agent's telemetry client, the updater's chunk download and the host's tools (flash, the
collector, the fleet simulator) all connect the same way: ``new_client(settings, protocol)``. paho is
imported inside the factory, so importing this module stays light.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PROTOCOLS = ("5", "3.1.1")


@dataclass(frozen=True)
class BrokerSettings:
    """Where a client connects and how it authenticates (the password already read from its file)."""

    host: str
    port: int = 1883
    username: str | None = None
    password: str | None = None
    tls: bool = False
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    client_id: str | None = None
    tls_insecure: bool = False


def new_client(settings: BrokerSettings, protocol: str | None = None, *, persistent: bool = False) -> Any:
    """Return a paho-mqtt 2 client (callback API 2) with the settings' credentials and TLS applied.

    ``protocol``: ``"5"`` (MQTT 5), ``"3.1.1"`` (MQTT 3.1.1) or None (paho's default, 3.1.1).
    ``persistent``: a session the caller acknowledges by hand after it has committed each message
    (``manual_ack``; in MQTT 3.1.1 with ``clean_session=False``, the same guarantee as an MQTT 5
    session expiry the caller sets on connect); otherwise a clean session. The caller sets
    callbacks, a will and limits, then connects.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client_id = settings.client_id or ""
    kw: dict[str, Any] = {"manual_ack": True} if persistent else {}
    if protocol == "5":
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, **kw)
    elif protocol == "3.1.1":
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=not persistent,
            protocol=mqtt.MQTTv311,
            **kw,
        )
    elif protocol is None:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, **kw)
    else:
        raise ValueError(f"MQTT protocol {protocol!r} is unknown. Known: {', '.join(PROTOCOLS)}")
    if settings.username is not None:
        c.username_pw_set(settings.username, settings.password)
    if settings.tls or settings.ca_file:
        c.tls_set(ca_certs=settings.ca_file, certfile=settings.cert_file, keyfile=settings.key_file)
        if settings.tls_insecure:
            c.tls_insecure_set(True)
    return c


__all__ = ["BrokerSettings", "new_client", "PROTOCOLS"]
