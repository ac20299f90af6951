"""Ground truth: prediction ids, POST /v1/feedback accounting on a real agent API, labelled counts in
windows and on the wire (old and new formats), ids unique across a restart of the real daemon."""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.api import ApiServer
from device_agent.config import ApiSettings
from device_agent.feedback import FeedbackBook, Outcome
from device_agent.formats.stats import CONFUSION_MAX_LABELS, Feedback, StatsError
from device_agent.formats.telemetry import TelemetryError, decode_stats, encode_stats
from tests.device_agent.agent_helpers import AgentProcess, http, write_config
from tests.fabricate import TABULAR_LABELS, tabular_data, tabular_onnx_bundle

STREAM = "0123456789abcdef"


@pytest.fixture(scope="module")
def pump_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tabular_onnx_bundle(tmp_path_factory.mktemp("pump") / "bundle")


@pytest.fixture
def server(pump_bundle: Path) -> Iterator[tuple[ApiServer, str]]:
    srv = ApiServer(Agent(pump_bundle), "127.0.0.1:0", settings=ApiSettings(feedback_max_ids=16))
    srv.start()
    try:
        yield srv, "http://" + srv.address
    finally:
        srv.shutdown()


# --------------------------------------------------------------------------------------------------
# pure logic


def test_book_tells_unknown_expired_and_already_labelled_apart() -> None:
    book = FeedbackBook(max_ids=3)
    book.remember(["a", "b", "c", "d"], [0, 1, 0, 1], "s1")  # "a" drops out
    assert len(book) == 3
    assert book.claim("a", "s1") == (Outcome.EXPIRED, None)
    assert book.claim("zz", "s1") == (Outcome.UNKNOWN, None)
    refused, issued = book.claim("b", "s1")
    assert refused is None and issued is not None and issued.predicted == 1
    assert book.claim("b", "s1") == (Outcome.ALREADY, None)
    assert book.claim("c", "s2") == (Outcome.MODEL_CHANGED, None)
    snap = book.snapshot()
    assert (snap["expired"], snap["unknown_id"], snap["already_labelled"], snap["model_changed"]) == (
        1,
        1,
        1,
        1,
    )


def test_feedback_merge_adds_exactly_and_is_associative() -> None:
    rng = np.random.default_rng(3)
    parts = []
    for _ in range(3):
        f = Feedback.empty(3)
        for t, p in rng.integers(0, 3, size=(int(rng.integers(1, 40)), 2)):
            f.add(int(t), int(p))
        parts.append(f)
    a, b, c = parts
    left, right = a.merge(b).merge(c), a.merge(b.merge(c))
    assert left.to_dict() == right.to_dict()
    assert left.labelled == sum(p.labelled for p in parts)
    assert left.correct == sum(p.correct for p in parts) == int(np.trace(left.confusion))
    assert Feedback.from_dict(left.to_dict(), 3).to_dict() == left.to_dict()
    # more labels than the confusion limit: counts only
    big = Feedback.empty(CONFUSION_MAX_LABELS + 1)
    big.add(40, 40)
    assert big.to_dict() == {"labelled": 1, "correct": 1, "confusion": None}


@pytest.mark.parametrize(
    ("doc", "msg"),
    [
        ({"labelled": 2, "correct": 3, "confusion": None}, "exceeds"),
        ({"labelled": 2, "correct": 1, "confusion": [[1, 0], [0, 0]]}, "add up"),
        ({"labelled": 1, "correct": 1, "confusion": [[1, 0]]}, "x 2"),
        ({"labelled": -1, "correct": 0, "confusion": None}, "non-negative"),
        ({"labelled": True, "correct": 0, "confusion": None}, "non-negative"),
        ({"labelled": 1, "correct": 1}, "keys"),
    ],
)
def test_feedback_decoder_is_strict(doc: dict, msg: str) -> None:
    with pytest.raises(StatsError, match=msg):
        Feedback.from_dict(doc, 2)


def test_windows_without_labels_stay_schema_2_and_labelled_ones_round_trip(pump_bundle: Path) -> None:
    agent = Agent(pump_bundle)
    x, _ = tabular_data(20, seed=2)
    agent.predict(x)
    plain = agent.close_window()
    kw = dict(device_id="pump-1", fleet="plant", window_start=0.0, window_end=1.0, stream=STREAM)
    raw = encode_stats(seq=1, model=agent.model.ref, profile=plain.profile, **kw)
    doc = json.loads(raw)
    assert doc["schema"] == 2 and "feedback" not in doc  # byte-compatible with collectors before labels
    assert decode_stats(raw).feedback is None
    agent.predict(x)
    assert agent.record_label("fault", 0, agent.model.ref.sha256) is False
    assert agent.record_label("normal", 0, agent.model.ref.sha256) is True
    assert agent.record_label("normal", 0, "0" * 64) is None  # another model: not counted
    labelled = agent.close_window()
    raw = encode_stats(seq=2, model=agent.model.ref, profile=labelled.profile, **kw)
    assert json.loads(raw)["schema"] == 3
    msg = decode_stats(raw)
    prof = msg.profile(agent.model.spec)
    assert prof.feedback is not None and prof.feedback.to_dict() == {
        "labelled": 2,
        "correct": 1,
        "confusion": [[1, 0], [1, 0]],  # rows: true normal, fault; columns: predicted
    }
    # merge: an unlabelled window plus a labelled one keeps the labelled counts exactly
    assert plain.profile.merge(prof).feedback.to_dict() == prof.feedback.to_dict()
    # a labelled heartbeat (labels, no predictions) is a window too
    agent.record_label("fault", 1, agent.model.ref.sha256)
    hb = agent.close_window()
    assert hb.count == 0
    raw = encode_stats(seq=3, model=agent.model.ref, profile=hb.profile, **kw)
    msg = decode_stats(raw)
    assert msg.heartbeat and msg.feedback is not None and msg.feedback.correct == 1
    # corruptions a strict decoder must refuse
    bad = json.loads(raw)
    bad["feedback"]["labelled"] = 0
    bad["feedback"]["correct"] = 0
    bad["feedback"]["confusion"] = [[0, 0], [0, 0]]
    with pytest.raises(TelemetryError, match="labelled must be > 0"):
        decode_stats(json.dumps(bad).encode())
    bad = json.loads(raw)
    del bad["feedback"]
    with pytest.raises(TelemetryError, match="feedback"):
        decode_stats(json.dumps(bad).encode())
    bad = json.loads(raw)
    bad["feedback"]["confusion"] = [[0, 0, 0], [0, 1, 0], [0, 0, 0]]
    with pytest.raises(TelemetryError, match="2 x 2"):
        decode_stats(json.dumps(bad).encode()).profile(agent.model.spec)


# --------------------------------------------------------------------------------------------------
# the real HTTP API


def _npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


@pytest.mark.timeout(60)
def test_predict_gives_unique_ids_for_every_body_type(server) -> None:
    srv, base = server
    x, _ = tabular_data(6, seed=4)
    code, js = http(base, "/v1/predict", {"inputs": x[:3].tolist()})
    assert code == 200 and len(js["ids"]) == 3
    import urllib.request

    req = urllib.request.Request(
        base + "/v1/predict", data=_npy(x[3:5]), headers={"Content-Type": "application/x-npy"}
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        npy = json.loads(r.read())
    req = urllib.request.Request(
        base + "/v1/predict",
        data=x[5:6].tobytes(),
        headers={"Content-Type": "application/octet-stream", "X-Shape": "1,4", "X-Dtype": "float32"},
    )
    with urllib.request.urlopen(req, timeout=10) as r:
        rawb = json.loads(r.read())
    ids = js["ids"] + npy["ids"] + rawb["ids"]
    assert len(npy["ids"]) == 2 and len(rawb["ids"]) == 1
    assert len(set(ids)) == 6 and all(isinstance(i, str) and 16 <= len(i) <= 64 for i in ids)
    # every one of them can be labelled
    code, out = http(base, "/v1/feedback", {"items": [{"id": i, "label": "normal"} for i in ids]})
    assert code == 200 and out["counted"] == 6 and out["refused"] == 0


@pytest.mark.timeout(60)
def test_feedback_accounting_on_the_real_api(server) -> None:
    srv, base = server
    srv.agent.close_window()
    x, _ = tabular_data(10, seed=6)
    code, out = http(base, "/v1/predict", {"inputs": x.tolist()})
    assert code == 200
    ids, predicted = out["ids"], out["labels"]
    other = {"normal": "fault", "fault": "normal"}
    # 7 right, 3 wrong (the true label is the predicted one or the other one)
    truth = [p if i < 7 else other[p] for i, p in enumerate(predicted)]
    for i in range(5):
        code, one = http(base, "/v1/feedback", {"id": ids[i], "label": truth[i]})
        assert code == 200 and one == {"id": ids[i], "outcome": "correct"}
    code, batch = http(
        base, "/v1/feedback", {"items": [{"id": ids[i], "label": truth[i]} for i in range(5, 10)]}
    )
    assert code == 200 and (batch["counted"], batch["refused"]) == (5, 0)
    assert [r["outcome"] for r in batch["results"]] == ["correct"] * 2 + ["incorrect"] * 3
    # refusals: one-line JSON errors with their HTTP codes, counted, nothing added to the window
    code, err = http(base, "/v1/feedback", {"id": ids[0], "label": truth[0]})
    assert code == 409 and err["outcome"] == "already_labelled" and "\n" not in err["error"]
    code, err = http(base, "/v1/feedback", {"id": "not-an-id-of-ours", "label": "normal"})
    assert code == 404 and err["outcome"] == "unknown_id"
    code, err = http(base, "/v1/feedback", {"id": ids[1], "label": "broken"})
    assert code == 400 and "normal, fault" in err["error"]
    code, err = http(base, "/v1/feedback", {"id": ids[1]})
    assert code == 400
    code, err = http(base, "/v1/feedback", raw=b"{nope")
    assert code == 400 and "JSON" in err["error"]
    # expired: 16 ids fit in the book ([api] feedback_max_ids); 20 more predictions push these out
    x2, _ = tabular_data(20, seed=7)
    assert http(base, "/v1/predict", {"inputs": x2.tolist()})[0] == 200
    code, err = http(base, "/v1/feedback", {"id": ids[9], "label": "normal"})
    assert code == 409 and err["outcome"] == "expired" and "feedback_max_ids" in err["error"]

    window = srv.agent.close_window()
    fb = window.profile.feedback
    assert fb is not None and (fb.labelled, fb.correct) == (10, 7)
    assert fb.accuracy == pytest.approx(0.7)
    conf = np.zeros((2, 2), np.int64)
    for t, p in zip(truth, predicted, strict=True):
        conf[TABULAR_LABELS.index(t), TABULAR_LABELS.index(p)] += 1
    assert np.array_equal(fb.confusion, conf)
    health = http(base, "/v1/health")[1]["api"]["feedback"]
    assert (health["correct"], health["incorrect"], health["already_labelled"]) == (7, 3, 1)
    assert (health["unknown_id"], health["expired"], health["bad_label"]) == (1, 1, 1)
    metrics = http(base, "/metrics")[1]
    assert "edgefleet_agent_feedback_correct_total 7" in metrics
    assert "edgefleet_agent_feedback_expired_total 1" in metrics


@pytest.mark.timeout(120)
def test_ids_are_unique_across_a_restart_of_the_daemon(pump_bundle: Path, tmp_path: Path) -> None:
    cfg = write_config(
        tmp_path / "agent.toml", bundle=pump_bundle, state_dir=tmp_path / "state", device_id="pump-1"
    )
    x, _ = tabular_data(50, seed=8)
    seen: list[str] = []
    first_id = None
    for run in range(2):
        agent = AgentProcess(cfg, tmp_path / f"agent{run}.log")
        try:
            base = agent.api_base()
            for i in range(0, 50, 10):
                code, out = http(base, "/v1/predict", {"inputs": x[i : i + 10].tolist()})
                assert code == 200
                seen += out["ids"]
            if run == 0:
                first_id = seen[0]
            else:
                # the book does not survive the restart: an id from before it is unknown, not counted
                code, err = http(base, "/v1/feedback", {"id": first_id, "label": "normal"})
                assert code == 404 and err["outcome"] == "unknown_id"
        finally:
            agent.stop()
    assert len(seen) == 100 and len(set(seen)) == 100
