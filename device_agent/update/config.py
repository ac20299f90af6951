"""The updater's configuration: the agent config's optional ``[update]`` table and the ``Updater`` an
agent builds from its ``AgentConfig`` (device policy only; never from a command or a bundle)."""

from __future__ import annotations

import logging
import ssl
from pathlib import Path
from typing import Any

from device_agent.config import broker_settings, check_table
from device_agent.errors import ConfigError
from device_agent.formats.manifest import VerifyPolicy
from device_agent.update.fetch import UpdateError
from device_agent.update.machine import Updater, UpdaterConfig

log = logging.getLogger(__name__)

UPDATE_CONFIG_KEYS: dict[str, tuple[type, ...]] = {
    "health_window_s": (int, float),
    "max_bundle_bytes": (int,),
    "staging_quota_bytes": (int,),
    "ca_file": (str,),
}


def parse_update_section(sec: Any) -> dict[str, Any]:
    """Validate the agent config's optional ``[update]`` table; raise ConfigError naming the key and the fix."""
    if sec is None:
        return {}
    check_table(sec, UPDATE_CONFIG_KEYS, "update")
    out: dict[str, Any] = {}
    for key, types in UPDATE_CONFIG_KEYS.items():
        if key not in sec:
            continue
        raw = sec[key]
        if isinstance(raw, bool) or not isinstance(raw, types):
            raise ConfigError(f"[update] {key} must be a number, got {str(raw)[:40]!r}")
        if key == "ca_file":
            if not Path(str(raw)).is_file():
                raise ConfigError(
                    f"[update] ca_file {raw!r} does not exist; give the CA certificate (PEM) of your"
                    " bundle server"
                )
            out[key] = str(raw)
            continue
        v = float(raw)  # type: ignore[arg-type]  # an int or float, checked just above
        if key == "health_window_s" and not 0 <= v <= 3600:
            raise ConfigError(f"[update] health_window_s must be between 0 and 3600 seconds, got {raw}")
        if key != "health_window_s" and v < 1024:
            raise ConfigError(f"[update] {key} must be at least 1024 bytes, got {raw}")
        out[key] = v if key == "health_window_s" else int(v)
    return out


def _not_attached(bundle_dir: Path) -> bool:
    raise UpdateError("the updater is not attached to a running agent yet")


def updater_for_agent(config: Any, trusted_keys: tuple[bytes, ...]) -> Updater:
    """Build the agent's updater from its ``AgentConfig`` and recover the store (before any model loads)."""
    upd = (getattr(config, "extra", None) or {}).get("update", {})
    mq = None
    if config.mqtt is not None:
        m = config.mqtt
        # never the daemon's own client id
        mq = broker_settings(m, client_id=f"{m.client_id or 'edgefleet-' + config.device_id}-ota"[:128])
    ucfg = UpdaterConfig(
        state_dir=Path(config.state_dir),
        policy=VerifyPolicy(
            trusted_keys=tuple(trusted_keys),
            allow_unsigned=bool(config.allow_unsigned),
            target=config.target,
            max_bytes=upd.get("max_bundle_bytes"),
        ),
        fallback_bundle=Path(config.bundle),
        health_window_s=upd.get("health_window_s"),
        staging_quota_bytes=upd.get("staging_quota_bytes"),
        device_id=config.device_id,
        mqtt=mq,
        ssl_context=ssl.create_default_context(cafile=upd["ca_file"]) if upd.get("ca_file") else None,
    )
    up = Updater(ucfg, switch=_not_attached)
    up.recover(report=False)
    up.seed_floor()
    up.check_active_slot()
    stale = up.store.remove_stale_partials()
    up.stale_partials_removed = len(stale)
    if stale:
        log.warning(
            "removed %d stale .partial drop(s) from %s (a flash stopped mid-copy): %s",
            len(stale),
            up.store.incoming_dir,
            ", ".join(p.name for p in stale[:5]),
        )
    return up


__all__ = ["UPDATE_CONFIG_KEYS", "parse_update_section", "updater_for_agent"]
