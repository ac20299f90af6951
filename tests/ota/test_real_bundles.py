"""OTA with the bundles the build pipeline makes (``digits_bundles``): every target, the real runtimes."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from device_agent.formats.deploy import LocalSource
from device_agent.formats.keys import load_trusted_keys
from device_agent.formats.manifest import VerifyPolicy, load_manifest, manifest_sha256
from tests.fabricate import repackage
from tests.ota.agent_proc import Agent, write_agent_config
from tests.ota.harness import Serving, make_updater
from toolchain.cli import main

pytestmark = pytest.mark.slow


def accuracy(serving: Serving, digits: dict[str, np.ndarray]) -> float:
    x = digits["x_test"][:200]
    scores = serving.predict_ok(x.reshape(len(x), *serving.predictor.sample_shape))  # type: ignore[union-attr]
    return float((scores.argmax(1) == digits["y_test"][:200]).mean())


@pytest.mark.parametrize("target", ["mobile", "raspberry-pi", "coral", "x86"])
def test_pipeline_bundle_updates_in_place(target, digits_bundles, ota_keys, tmp_path, digits) -> None:
    src = digits_bundles / target
    v1 = repackage(src, tmp_path / "v1", version=1, key=ota_keys["key"])
    v2 = repackage(src, tmp_path / "v2", version=2, key=ota_keys["key"])
    pol = VerifyPolicy(trusted_keys=load_trusted_keys([ota_keys["pub"]]), target=target)
    serving = Serving(pol)
    up = make_updater(tmp_path / "state", serving, pol, fallback=v1)
    before = accuracy(serving, digits)
    drop = shutil.copytree(v2, tmp_path / "drop")
    assert up.deploy(LocalSource(str(drop))) is True, serving.events[-1]
    assert serving.version == 2 and serving.sha256 == manifest_sha256(v2)
    assert accuracy(serving, digits) == pytest.approx(before)
    assert before > 0.8
    # a bundle of another target is refused, the update is rolled back to nothing, v2 keeps serving
    other = "x86" if target != "x86" else "mobile"
    wrong = repackage(digits_bundles / other, tmp_path / "wrong", version=3, key=ota_keys["key"])
    assert up.deploy(LocalSource(str(wrong))) is False
    assert serving.version == 2 and "target" in serving.events[-1][2]["reason"]


@pytest.mark.broker
@pytest.mark.timeout(300)
def test_running_agent_takes_a_pipeline_bundle_over_mqtt_chunks(
    digits_bundles, ota_keys, tmp_path, mosquitto, digits
) -> None:
    src = digits_bundles / "raspberry-pi"
    v1 = repackage(src, tmp_path / "v1", version=1, key=ota_keys["key"])
    v2 = repackage(src, tmp_path / "v2", version=5, key=ota_keys["key"])
    cfg = write_agent_config(
        tmp_path / "agent.toml",
        bundle=v1,
        state_dir=tmp_path / "state",
        pub=ota_keys["pub"],
        mqtt_url=mosquitto.url,
        target="raspberry-pi",
    )
    agent = Agent(cfg, tmp_path / "agent.log")
    try:
        assert agent.model_version() == 1
        from tests.ota.agent_proc import wait_for

        wait_for(lambda: agent.health()["mqtt"]["connected"], 30, "MQTT connection")
        r = CliRunner().invoke(
            main,
            [
                "flash",
                str(v2),
                "--to",
                f"mqtt://127.0.0.1:{mosquitto.port}/lab/pi-001",
                "--key",
                str(ota_keys["pub"]),
                "--wait",
                "120",
            ],
        )
        assert r.exit_code == 0 and "now serves" in r.output, r.output + agent.log()[-2000:]
        h = agent.health()
        assert h["model"]["version"] == 5 and h["model"]["runtime"] == "litert"
        x = digits["x_test"][:20]
        shape = load_manifest(v2).inputs[0].shape[1:]
        out = agent.predict(x.reshape(len(x), *shape).tolist())
        assert out["model"]["version"] == 5
        assert (
            np.mean([int(lbl) == y for lbl, y in zip(out["labels"], digits["y_test"][:20], strict=True)])
            > 0.7
        )
    finally:
        agent.stop()
