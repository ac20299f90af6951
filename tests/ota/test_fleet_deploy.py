"""``edgefleet fleet deploy``: canary waves against real agents on a real Mosquitto broker."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.ota.agent_proc import Agent, start_fleet_agents, wait_for
from toolchain.cli import main
from toolchain.shipping.deploy import DeployError, plan_waves


def test_plan_waves() -> None:
    devs = ["a", "b", "c", "d", "e"]
    assert plan_waves(devs, 1) == [["a"], ["b", "c", "d", "e"]]
    assert plan_waves(devs, 2, 2) == [["a", "b"], ["c", "d"], ["e"]]
    assert plan_waves(devs, 0) == [devs]
    assert plan_waves(["a", "a", "b"], 1) == [["a"], ["b"]]
    assert plan_waves(["a"], 3) == [["a"]]
    with pytest.raises(DeployError):
        plan_waves(devs, -1)


@pytest.fixture
def fleet(tmp_path: Path, make_version, ota_keys, mosquitto) -> Iterator[Callable[..., dict[str, Agent]]]:
    started: list[Agent] = []

    def start(devices: dict[str, str]) -> dict[str, Agent]:
        """devices: id -> target it is configured for."""
        # each device starts from a v1 built for its own target
        v1s = {dev: make_version(1, target=target) for dev, target in devices.items()}
        return start_fleet_agents(
            tmp_path, v1s, pub=ota_keys["pub"], mqtt_url=mosquitto.url, targets=devices, started=started
        )

    yield start
    for a in started:
        a.stop()


def deploy(bundle: Path, broker: str, options: str) -> tuple[int, str]:
    """Run ``edgefleet fleet deploy BUNDLE --broker BROKER --fleet lab OPTIONS`` (split on spaces)."""
    args = ["fleet", "deploy", str(bundle), "--broker", broker, "--fleet", "lab", *options.split()]
    r = CliRunner().invoke(main, args)
    return r.exit_code, r.output


@pytest.mark.broker
@pytest.mark.timeout(300)
def test_canary_then_rest_over_the_whole_fleet(fleet, mosquitto, make_version, ota_keys) -> None:
    agents = fleet({"cam-1": "x86", "cam-2": "x86", "cam-3": "x86"})
    v2 = make_version(2)
    code, out = deploy(v2, mosquitto.url, f"--canary 1 --key {ota_keys['pub']} --timeout 120 --json")
    assert code == 0, out
    doc = json.loads(out)
    assert doc["waves"] == [["cam-1"], ["cam-2", "cam-3"]]
    assert {d: r["state"] for d, r in doc["devices"].items()} == {d: "deployed" for d in agents}
    for a in agents.values():
        assert a.model_version() == 2


@pytest.mark.broker
@pytest.mark.timeout(300)
def test_failing_canary_stops_the_rollout(fleet, mosquitto, make_version) -> None:
    # cam-0 is the canary and is (mis)configured as a coral device: it refuses the x86 bundle
    agents = fleet({"cam-0": "coral", "cam-1": "x86", "cam-2": "x86"})
    v2 = make_version(2)
    code, out = deploy(
        v2, mosquitto.url, "--device cam-0 --device cam-1 --device cam-2 --canary 1 --timeout 120"
    )
    assert code == 1, out
    assert "rollout STOPPED" in out
    lines = {ln.split()[0]: ln for ln in out.splitlines() if ln.startswith("  ")}
    assert "failed" in lines["cam-0"] and "target" in lines["cam-0"]
    assert "not_reached" in lines["cam-1"] and "not_reached" in lines["cam-2"]
    for a in agents.values():
        assert a.model_version() == 1
    for dev in ("cam-1", "cam-2"):  # never even received a command
        assert agents[dev].health()["deployment"]["state"] == "idle"


@pytest.mark.broker
@pytest.mark.timeout(300)
def test_failure_threshold_lets_the_rollout_continue(fleet, mosquitto, make_version) -> None:
    agents = fleet({"cam-0": "x86", "cam-1": "coral", "cam-2": "x86"})
    v2 = make_version(2)
    code, out = deploy(
        v2,
        mosquitto.url,
        "--device cam-0 --device cam-1 --device cam-2 --canary 1 --wave-size 1 --max-failures 1 --timeout 120 --json",
    )
    doc = json.loads(out)
    assert code == 1 and not doc["stopped"] and doc["failures"] == 1, (
        out
    )  # within the threshold, but not clean
    assert doc["devices"]["cam-1"]["state"] == "failed"
    assert agents["cam-0"].model_version() == 2 and agents["cam-2"].model_version() == 2
    assert agents["cam-1"].model_version() == 1


@pytest.mark.broker
@pytest.mark.timeout(120)
def test_fleet_discovery_skips_other_targets_and_offline_devices(fleet, mosquitto, make_version) -> None:
    agents = fleet({"cam-1": "x86", "cam-2": "x86", "tpu-1": "coral"})
    agents["cam-1"].stop()  # offline: its shutdown status says so
    code, out = deploy(make_version(2), mosquitto.url, "--timeout 60 --json")
    assert code == 0, out
    devs = json.loads(out)["devices"]
    assert devs["cam-2"]["state"] == "deployed"
    assert devs["cam-1"]["state"] == "skipped" and devs["cam-1"]["reason"] == "offline"
    assert devs["tpu-1"]["state"] == "skipped" and "target" in devs["tpu-1"]["reason"]
    assert agents["tpu-1"].model_version() == 1
    agents["cam-2"].stop()
    code, out = deploy(make_version(3), mosquitto.url, "--timeout 30")
    assert code == 1 and "no online device" in out, out


@pytest.mark.broker
@pytest.mark.timeout(180)
def test_fleet_status_shows_each_devices_deployment_state(fleet, mosquitto, make_version, tmp_path) -> None:
    from toolchain.fleet.collector import Collector

    db = f"sqlite:///{tmp_path / 'fleet.db'}"
    collector = Collector(db, mosquitto.url, fleet="lab", evaluate=False)
    collector.start()
    try:
        agents = fleet({"cam-1": "x86", "tpu-1": "coral"})
        code, out = deploy(
            make_version(2),
            mosquitto.url,
            "--device cam-1 --device tpu-1 --canary 0 --max-failures 1 --timeout 60",
        )
        assert code == 1, out  # tpu-1 refuses an x86 bundle

        seen: list[object] = []

        def states() -> dict[str, str] | None:
            r = CliRunner().invoke(main, ["fleet", "status", "--db", db, "--json"])
            if r.exit_code != 0:
                seen.append(r.output[-300:])
                return None
            got = {d["device_id"]: d["deployment_state"] for d in json.loads(r.output)["devices"]}
            seen.append(got)
            return got if got == {"cam-1": "committed", "tpu-1": "failed"} else None

        try:
            wait_for(states, 60, "fleet status to show committed/failed deployments")
        except AssertionError as e:
            raise AssertionError(f"{e}; last seen: {seen[-1:]}; deploy said: {out[-500:]}") from None
        assert agents["cam-1"].model_version() == 2 and agents["tpu-1"].model_version() == 1
    finally:
        collector.stop()
