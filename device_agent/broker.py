"""An embedded MQTT 3.1.1 broker (amqtt) in a background thread, for the demo, laptops and tests.

amqtt is a host/demo extra: nothing on the agent's normal path imports this module.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import Any

from device_agent.errors import AgentError

START_TIMEOUT_S = 15.0


class BrokerError(AgentError):
    """The embedded broker could not start (amqtt missing, port taken)."""


class EmbeddedBroker:
    """Run an amqtt broker on ``host:port`` in its own thread and event loop.

    ``port=0`` picks a free port. Anonymous clients are allowed; it listens on 127.0.0.1 by default.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host = host
        self.port = port or _free_port(host)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Any = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self) -> EmbeddedBroker:
        """Start the broker and wait until it accepts connections."""
        try:
            import amqtt.broker  # noqa: F401
        except ImportError:
            raise BrokerError(
                "the embedded broker needs amqtt; pip install 'edgefleet[host]' or amqtt"
            ) from None
        # amqtt logs every client that connects and drops (port probes, reconnects) as an ERROR with a
        # traceback; an embedded demo broker should stay quiet unless debugging.
        quiet = logging.DEBUG if logging.getLogger().isEnabledFor(logging.DEBUG) else logging.CRITICAL
        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(quiet)
        self._ready.clear()
        self._thread = threading.Thread(target=self._run, name="amqtt-broker", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT_S) or self._error is not None:
            raise BrokerError(f"embedded broker did not start on {self.host}:{self.port}: {self._error}")
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        raise BrokerError(f"embedded broker does not accept connections on {self.host}:{self.port}")

    def _run(self) -> None:
        from amqtt.broker import Broker

        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        # Client connections that die mid-handshake surface as "unhandled exception in
        # client_connected_cb"; they concern that one client only.
        loop.set_exception_handler(
            lambda _loop, ctx: logging.getLogger(__name__).debug("embedded broker: %s", ctx.get("message"))
        )
        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"{self.host}:{self.port}"}},
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }

        async def boot() -> None:
            self._broker = Broker(config)
            await self._broker.start()

        try:
            loop.run_until_complete(boot())
        except BaseException as e:  # report any start failure to the caller's thread
            self._error = e
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        loop.run_forever()
        loop.close()

    def stop(self) -> None:
        """Shut the broker down and join its thread."""
        loop, broker = self._loop, self._broker
        if loop is None or broker is None or self._thread is None:
            return
        fut = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)
        try:
            fut.result(timeout=10)
        except Exception:  # shutting down anyway
            pass
        loop.call_soon_threadsafe(loop.stop)
        self._thread.join(10)
        self._loop = self._broker = self._thread = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
