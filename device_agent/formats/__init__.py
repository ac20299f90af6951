"""What the host and the device agree on, and nothing else: every format both sides read or write.

``manifest``   bundle manifest (schema 2), its verification policy and signatures
``stats``      input/output profiles, their merge and the baseline encoding
``telemetry``  the MQTT payloads (stats, status, events) and topics
``deploy``     the OTA deploy command and its sources' wire format
``alertcmd``   the fleet's retained per-device alert command (``.../cmd/alert``)
``keys``       trusted public key files
``files``      the store files the host writes onto a device (``.partial`` drops, fsync, the floor)
``strict``     the one strict-keys validator and bounded integer every decoder here uses
``broker``     MQTT connection settings and the one paho client factory (auth, TLS, protocol)

The host (``toolchain``, ``benchmarks``) imports the device package only through this package,
``device_agent.runtimes`` and ``device_agent.agent``; ``tests/test_architecture.py`` keeps that rule.
``AgentError`` is the root of every error raised here, so the host can catch the device's errors.
"""

from device_agent.errors import AgentError

__all__ = ["AgentError"]
