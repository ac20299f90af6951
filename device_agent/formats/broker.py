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


def new_client(settings: BrokerSettings, protocol: str | None = None) -> Any:
    """Return a paho-mqtt 2 client (callback API 2) with the settings' credentials and TLS applied.

    ``protocol``: ``"5"`` (MQTT 5), ``"3.1.1"`` (MQTT 3.1.1 with a clean session) or None (paho's
    default, 3.1.1). The caller sets callbacks, a will and limits, then connects.
    """
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client_id = settings.client_id or ""
    if protocol == "5":
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    elif protocol == "3.1.1":
        c = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True, protocol=mqtt.MQTTv311
        )
    elif protocol is None:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
    else:
        raise ValueError(f"MQTT protocol {protocol!r} is unknown. Known: {', '.join(PROTOCOLS)}")
    if settings.username is not None:
        c.username_pw_set(settings.username, settings.password)
    if settings.tls:
        c.tls_set(ca_certs=settings.ca_file, certfile=settings.cert_file, keyfile=settings.key_file)
    return c


__all__ = ["BrokerSettings", "new_client", "PROTOCOLS"]
