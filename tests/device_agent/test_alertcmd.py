"""The alert command format (device_agent.formats.alertcmd) and the follower's logic (device_agent.alertfollow)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import device_agent.alertfollow as follow_mod
from device_agent.alertfollow import AlertFollower
from device_agent.formats.alertcmd import (
    ALERT_COMMAND_MAX_BYTES,
    SEQ_MAX,
    AlertCommandError,
    alert_command_topic,
    decode_alert_command,
    encode_alert_command,
    is_alert_command_topic,
)

SHA = "ab" * 32


def _doc(**over: object) -> dict[str, object]:
    d: dict[str, object] = {
        "schema": 1,
        "type": "alert_state",
        "fleet": "lab",
        "device_id": "pi-001",
        "in_alert": True,
        "seq": 1_796_000_000_123_456,
    }
    d.update(over)
    return {k: v for k, v in d.items() if v is not ...}


def _raw(**over: object) -> bytes:
    return json.dumps(_doc(**over)).encode()


# -------------------------------------------------------------------------------------------- format


def test_round_trip_keeps_every_field() -> None:
    raw = encode_alert_command(
        fleet="lab",
        device_id="pi-001",
        in_alert=True,
        seq=1_796_000_000_123_456,
        state="alert",
        reason="input psi 0.41 > 0.2",
        score=0.41,
        model_sha256=SHA,
    )
    c = decode_alert_command(raw)
    assert (c.fleet, c.device_id, c.in_alert, c.seq) == ("lab", "pi-001", True, 1_796_000_000_123_456)
    assert (c.state, c.reason, c.score, c.model_sha256) == ("alert", "input psi 0.41 > 0.2", 0.41, SHA)
    assert c.ts is not None and c.ts.endswith("Z")


def test_topic_shape() -> None:
    t = alert_command_topic("lab", "pi-001")
    assert t == "edgefleet/lab/pi-001/cmd/alert" and is_alert_command_topic(t)
    assert not is_alert_command_topic("edgefleet/lab/pi-001/cmd")
    assert not is_alert_command_topic("edgefleet/lab/alerts")
    assert not is_alert_command_topic("edgefleet/lab/x/y/cmd/alert")


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        (b"x" * (ALERT_COMMAND_MAX_BYTES + 1), "exceeds"),
        (b"\xff\xfe", "UTF-8"),
        (b"[1]", "object"),
        (_raw(schema=2), "schema"),
        (_raw(schema="1"), "schema"),
        (_raw(type="deploy"), "type"),
        (_raw(extra=1), "unknown key"),
        (_raw(seq=...), "missing"),
        (_raw(in_alert=1), "in_alert"),
        (_raw(in_alert="true"), "in_alert"),
        (_raw(seq=0), "seq"),
        (_raw(seq=1.5), "seq"),
        (_raw(seq=True), "seq"),
        (_raw(seq=SEQ_MAX + 1), "seq"),
        (_raw(fleet="Lab"), "fleet"),
        (_raw(device_id="../x"), "device_id"),
        (_raw(state="panic"), "state"),
        (_raw(reason="r" * 501), "reason"),
        (_raw(reason=5), "reason"),
        (_raw(score="0.4"), "score"),
        (_raw(score=True), "score"),
        (_raw().replace(b"}", b', "score": NaN}'), "JSON"),
        (_raw().replace(b"}", b', "score": 1e999}'), ""),
        (_raw(model_sha256="AB" * 32), "model_sha256"),
        (_raw(ts=7), "ts"),
    ],
)
def test_decoder_refuses_with_a_reason(raw: bytes, says: str) -> None:
    with pytest.raises(AlertCommandError) as e:
        decode_alert_command(raw)
    assert says.lower() in str(e.value).lower()
    assert len(str(e.value)) < 300  # untrusted bytes never make a long message


def test_size_is_checked_before_parsing() -> None:
    # A deeply nested document over the limit is refused by size, not by the parser.
    raw = b"[" * (ALERT_COMMAND_MAX_BYTES + 10)
    with pytest.raises(AlertCommandError, match="exceeds"):
        decode_alert_command(raw)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_decoder_never_raises_anything_else(raw: bytes) -> None:
    try:
        decode_alert_command(raw)
    except AlertCommandError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.booleans(),
    st.integers(1, SEQ_MAX),
    st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True, width=64)),
    st.one_of(st.none(), st.text(max_size=600)),
)
def test_what_the_encoder_writes_decodes(
    in_alert: bool, seq: int, score: float | None, reason: str | None
) -> None:
    c = decode_alert_command(
        encode_alert_command(
            fleet="f-1", device_id="d.2", in_alert=in_alert, seq=seq, score=score, reason=reason
        )
    )
    assert (c.in_alert, c.seq) == (in_alert, seq)
    assert c.reason == (reason[:500] if reason is not None else None)


# -------------------------------------------------------------------------------------------- follower


def _cmd(seq: int, in_alert: bool = True, device: str = "pi-001", fleet: str = "lab") -> bytes:
    return encode_alert_command(fleet=fleet, device_id=device, in_alert=in_alert, seq=seq, reason="r")


def _follower(tmp_path: Path, seen: list[bool] | None = None) -> AlertFollower:
    return AlertFollower(
        tmp_path, fleet="lab", device_id="pi-001", on_change=(seen.append if seen is not None else None)
    )


def test_applies_newer_commands_and_persists_them(tmp_path: Path) -> None:
    seen: list[bool] = []
    f = _follower(tmp_path, seen)
    assert f.status()["in_alert"] is False and f.status()["since"] is None
    assert f.handle("t", _cmd(10, True))
    assert f.in_alert and seen == [True]
    doc = json.loads((tmp_path / "alert_state.json").read_text())
    assert doc["in_alert"] is True and doc["seq"] == 10
    assert f.handle("t", _cmd(20, False))
    assert not f.in_alert and seen == [True, False]
    again = _follower(tmp_path)  # a restart
    assert again.in_alert is False and again.seq == 20
    s = f.status()
    assert s["applied"] == 2 and s["refused_total"] == 0


def test_restart_restores_the_alert(tmp_path: Path) -> None:
    _follower(tmp_path).handle("t", _cmd(99, True))
    f = _follower(tmp_path)
    assert f.in_alert and f.seq == 99 and f.status()["since"] is not None
    assert not f.handle("t", _cmd(99, True))  # the retained copy after the restart: a duplicate
    s = f.status()
    assert s["duplicates"] == 1 and s["refused_total"] == 0 and s["applied"] == 0


def test_refusals_are_counted_by_reason_and_change_nothing(tmp_path: Path) -> None:
    seen: list[bool] = []
    f = _follower(tmp_path, seen)
    f.handle("t", _cmd(50, True))
    assert not f.handle("t", _cmd(40, False))  # stale: older than what is applied
    assert not f.handle("t", _cmd(60, False, device="pi-002"))  # another device
    assert not f.handle("t", _cmd(60, False, fleet="other"))  # another fleet
    assert not f.handle("t", b'{"schema": 1, "type": "alert_state"}')  # malformed
    assert not f.handle("t", b"")  # an empty retained message
    assert f.in_alert and f.seq == 50 and seen == [True]
    assert f.status()["refused"] == {"malformed": 2, "foreign": 2, "stale": 1}
    assert f.status()["refused_total"] == 5


def test_refusals_are_logged_once_per_reason_rate_limited(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = _follower(tmp_path)
    caplog.set_level(logging.WARNING, "edgefleet.alertfollow")
    for _ in range(50):
        f.handle("t", b"not json")
    for _ in range(50):
        f.handle("t", _cmd(5, device="pi-009"))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "(malformed)" in lines[0] and "(foreign)" in lines[1]
    assert f.status()["refused"]["malformed"] == 50
    monkeypatch.setattr(follow_mod, "LOG_EVERY_S", 0.0)  # the next line reports what was held back
    f.handle("t", b"not json")
    assert "50 malformed command(s) since the last such line" in caplog.records[-1].getMessage()


@pytest.mark.parametrize(
    "content",
    [b"{not json", b'{"schema": 1, "in_alert": "yes", "seq": 3, "since": null}', b"[]", b"x" * 5000],
)
def test_a_corrupt_state_file_is_logged_and_ignored(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "alert_state.json").write_bytes(content)
    caplog.set_level(logging.WARNING, "edgefleet.alertfollow")
    f = _follower(tmp_path)
    assert f.in_alert is False and f.seq == 0 and f.status()["state_file_errors"] == 1
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    assert f.handle("t", _cmd(7, True))  # and the next command repairs it
    assert _follower(tmp_path).in_alert is True


def test_an_unwritable_state_file_keeps_the_alert_in_memory(tmp_path: Path) -> None:
    f = _follower(tmp_path)
    (tmp_path / "alert_state.json").mkdir()  # the rename onto a directory fails
    assert f.handle("t", _cmd(7, True))
    assert f.in_alert and f.status()["state_file_errors"] == 1


def test_a_failing_hook_does_not_undo_the_state(tmp_path: Path) -> None:
    def boom(on: bool) -> None:
        raise RuntimeError("capturer broke")

    f = AlertFollower(tmp_path, fleet="lab", device_id="pi-001", on_change=boom)
    assert f.handle("t", _cmd(3, True))
    assert f.in_alert


def test_a_refused_command_subscription_is_logged_once_and_shown(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Brokers that check ACLs at SUBSCRIBE time (EMQX, HiveMQ) answer 0x87 for a topic a device may not
    read; the publisher names it in health and logs it once (Mosquitto grants and filters instead)."""
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.reasoncodes import ReasonCode

    from device_agent.config import MqttSettings
    from device_agent.mqtt import MqttPublisher
    from device_agent.outbox import Outbox

    box = Outbox(tmp_path / "o.sqlite3", 10, 1 << 20)
    pub = MqttPublisher(
        MqttSettings("mqtt://127.0.0.1:1", "127.0.0.1", 1, False),
        box,
        fleet="lab",
        device_id="pi-001",
        status_payload=lambda s: b"{}",
    )
    caplog.set_level(logging.WARNING, "device_agent.mqtt")
    topics = [*pub.cmd_topics, pub.alert_topic]
    granted, refused = (
        ReasonCode(PacketTypes.SUBACK, identifier=1),
        ReasonCode(PacketTypes.SUBACK, identifier=0x87),
    )
    for mid in (5, 6):  # two connections, the same refusal
        pub._sub_topics = {mid: topics}
        pub._on_subscribe(None, None, mid, [granted, granted, refused], None)
    assert pub.health()["subscribe_refused"] == ["edgefleet/lab/pi-001/cmd/alert"]
    lines = [r.getMessage() for r in caplog.records if "refused the subscription" in r.getMessage()]
    assert len(lines) == 1 and "edgefleet/lab/pi-001/cmd/alert" in lines[0]
    box.close()
