"""The native single-sample path (``kernels.Runner``) on real int8 LiteRT bundles.

``Agent.predict`` hands one float32 sample to the runner, which checks, quantizes, runs, decodes and
records it in one C call; these tests hold it to the general path's results and bookkeeping.
"""

from __future__ import annotations

import shutil
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent import kernels

pytestmark = pytest.mark.skipif(not kernels.NATIVE, reason="device_agent._kernels not built or turned off")


def _bundles() -> dict[str, Any]:
    from tests.device_agent.agent_bundles import cached_tflite_bundle, cached_tflite_image_bundle

    return {"elements": cached_tflite_bundle, "image": cached_tflite_image_bundle}


def _inputs(kind: str, n: int) -> np.ndarray:
    from tests.device_agent.agent_bundles import digits, upsampled

    x = digits()["x_test"][:n]
    return np.ascontiguousarray(upsampled(x, 3)) if kind == "image" else x


def _no_general_single(*_: Any) -> Any:
    raise AssertionError("a float32 sample took the general path")


@pytest.mark.parametrize("kind", ["elements", "image"])
def test_runner_gives_the_batch_path_results_and_window(kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Scores bit for bit, labels, top scores and the window's profile equal the batch path's,
    for element features (8x8) and per-channel image summaries (24x24), across a fold."""
    from device_agent import windows
    from device_agent.agent import Agent, Prediction
    from device_agent.inference import Predictor

    for name in ("FLUSH_ROWS", "MIN_FLUSH_ROWS", "SUMMARY_FLUSH_ROWS"):
        monkeypatch.setattr(windows, name, 128)  # fold twice on the way (the runner calls flush)
    bundle = _bundles()[kind]()
    x = _inputs(kind, 300)
    single = Agent(bundle, runtime="litert")
    batched = Agent(bundle, runtime="litert")
    assert single._one is not None, "the int8 LiteRT bundle gets the native runner"
    assert single._window._rows == 128
    want = batched.predict(x)
    monkeypatch.setattr(Predictor, "load_one", _no_general_single)
    for i in range(len(x)):
        got = single.predict(x[i])
        assert isinstance(got, Prediction) and got.model == single.model.ref
        assert got.outputs.shape == (1, 10) and got.outputs.dtype == np.float32
        assert np.array_equal(got.outputs, want.outputs[i : i + 1])
        assert got.labels == want.labels[i : i + 1] and got.scores == [want.scores[i]]
    assert single.predictions_total == len(x)
    a, b = single.close_window().profile, batched.close_window().profile
    assert a.count == b.count == len(x)
    assert np.array_equal(a.inputs.counts, b.inputs.counts)
    assert np.array_equal(a.inputs.min, b.inputs.min) and np.array_equal(a.inputs.max, b.inputs.max)
    assert np.allclose(a.inputs.mean, b.inputs.mean) and np.allclose(a.inputs.m2, b.inputs.m2)
    assert a.class_counts.tolist() == b.class_counts.tolist()
    assert np.array_equal(a.confidence.counts, b.confidence.counts)
    assert a.latency_ms.count.tolist() == [len(x)]


def test_runner_leaves_other_inputs_to_the_general_path() -> None:
    """float64, lists, non-contiguous views and (8, 8, 1) vs (1, 8, 8, 1) all give the runner's
    scores; a wrong shape and NaN are refused with their kind and counted, and record nothing."""
    from device_agent.agent import Agent
    from device_agent.inference import InputError

    agent = Agent(_bundles()["elements"](), runtime="litert")
    x = _inputs("elements", 4)
    ref = agent.predict(x[0]).outputs
    assert np.array_equal(agent.predict(x[0][None]).outputs, ref)
    assert np.array_equal(agent.predict(x[0].astype(np.float64)).outputs, ref)
    assert np.array_equal(agent.predict(x[0].tolist()).outputs, ref)
    wide = np.zeros((8, 16, 1), np.float32)
    wide[:, ::2] = x[0]
    assert np.array_equal(agent.predict(wide[:, ::2]).outputs, ref)  # not contiguous
    assert agent.window_count() == 5
    with pytest.raises(InputError) as e:
        agent.predict(np.zeros((8, 7, 1), np.float32))
    assert e.value.kind == "shape"
    bad = x[1].copy()
    bad[2, 2, 0] = np.nan
    with pytest.raises(InputError) as e:
        agent.predict(bad)
    assert e.value.kind == "nan"
    assert agent.window_count() == 5
    closed = agent.close_window()
    assert closed.count == 5 and closed.profile.schema_violations == {"shape": 1, "nan": 1}


def test_runner_closes_windows_at_the_sample_limit() -> None:
    """window_max_samples closes windows on the native path too; predictions_total counts all."""
    from device_agent.agent import Agent

    closed: list[Any] = []
    agent = Agent(_bundles()["elements"](), runtime="litert", window_max_samples=5, on_window=closed.append)
    for xi in _inputs("elements", 12):
        agent.predict(xi)
    assert [w.count for w in closed] == [5, 5]
    assert agent.window_count() == 2 and agent.predictions_total == 12


def test_model_switch_retires_the_old_runner(tmp_path: Path) -> None:
    """After a switch the old runner declines (its caller falls back to the general path), and the
    new model's runner serves."""
    from device_agent.agent import Agent

    src = _bundles()["elements"]()
    other = tmp_path / "b2"
    shutil.copytree(src, other)
    agent = Agent(src, runtime="litert")
    x = _inputs("elements", 1)[0]
    old = agent._one
    assert old is not None and old(x) is not None
    agent.switch_bundle(other)
    assert old(x) is None
    assert agent._one is not None and agent._one is not old
    assert agent.model.path == other
    assert agent.predict(x).labels == agent.predict(x[None]).labels
    assert agent.window_count() == 2 and agent.predictions_total == 3


def test_runner_serializes_threads() -> None:
    """Four threads predicting at once: every prediction counted once, scores as alone."""
    from device_agent.agent import Agent

    agent = Agent(_bundles()["elements"](), runtime="litert")
    x = _inputs("elements", 50)
    want = agent.predict(x).outputs
    agent.close_window()
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(6):
                for i in range(len(x)):
                    assert np.array_equal(agent.predict(x[i]).outputs, want[i : i + 1])
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert agent.close_window().count == 4 * 6 * len(x)


def test_runner_refuses_buffers_that_do_not_fit() -> None:
    """Construction and binding check sizes; an unbound runner declines every sample."""
    invoke = lambda: None  # noqa: E731
    inp, out, table = np.zeros(64, np.int8), np.zeros(10, np.int8), np.zeros(256, np.float32)
    with pytest.raises(ValueError, match="bytes for the shape"):
        kernels.Runner(invoke, np.zeros(63, np.int8), out, (8, 8, 1), 0.1, 0.0, -128, 127, table)
    with pytest.raises(ValueError, match="table"):
        kernels.Runner(invoke, inp, out, (8, 8, 1), 0.1, 0.0, -128, 127, np.zeros(255, np.float32))
    with pytest.raises(ValueError, match="8-bit range"):
        kernels.Runner(invoke, inp, out, (8, 8, 1), 0.0, 0.0, -128, 127, table)
    r = kernels.Runner(invoke, inp, out, (8, 8, 1), 0.1, 0.0, -128, 127, table)
    assert r.predict(np.zeros((8, 8, 1), np.float32)) is None and r.rows == 0
    lock = threading.Lock()
    with pytest.raises(ValueError, match="feats must hold"):
        r.bind(
            None,
            lock,
            np.zeros(1, np.int64),
            np.zeros((4, 63)),
            np.zeros((4, 10)),
            np.zeros(4),
            None,
            tuple,
            tuple("abcdefghij"),
            None,
        )
    with pytest.raises(ValueError, match="one label per score"):
        r.bind(
            None,
            lock,
            np.zeros(1, np.int64),
            np.zeros((4, 64)),
            np.zeros((4, 10)),
            np.zeros(4),
            None,
            tuple,
            ("a",),
            None,
        )
    assert r.rows == 0


def test_batch_runner_takes_over_repeated_batch_sizes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch size seen twice in a row goes native from the third batch on, with the general
    path's results; another size closes that runner before the batch interpreter is resized (LiteRT
    would refuse to resize while the runner held it), and windows rotate under both runners."""
    from device_agent.agent import Agent
    from device_agent.inference import Predictor

    closed: list[Any] = []
    bundle = _bundles()["elements"]()
    x = _inputs("elements", 64)
    ref = Agent(bundle, runtime="litert").predict(x)
    agent = Agent(bundle, runtime="litert", window_max_samples=40, on_window=closed.append)
    general = Predictor.encode_checked
    calls: list[int] = []

    def counted(self: Predictor, arr: np.ndarray) -> np.ndarray:
        calls.append(len(arr))
        return general(self, arr)

    monkeypatch.setattr(Predictor, "encode_checked", counted)
    for lo in (0, 16, 32, 48, 0, 16):
        got = agent.predict(x[lo : lo + 16])
        assert np.array_equal(got.outputs, ref.outputs[lo : lo + 16])
        assert got.labels == ref.labels[lo : lo + 16] and got.scores == ref.scores[lo : lo + 16]
    assert calls == [16, 16]  # then the runner
    # a float64 batch of that size takes the general path beside the runner, which stays
    assert np.array_equal(agent.predict(x[:16].astype(np.float64)).outputs, ref.outputs[:16])
    assert np.array_equal(agent.predict(x[16:32]).outputs, ref.outputs[16:32])
    assert calls == [16, 16, 16]
    for lo in (0, 8, 16, 24):  # another size: general twice (resizing), then native
        assert np.array_equal(agent.predict(x[lo : lo + 8]).outputs, ref.outputs[lo : lo + 8])
    assert calls == [16, 16, 16, 8, 8]
    assert np.array_equal(agent.predict(x[:16]).outputs, ref.outputs[:16])  # general again: resizes
    assert calls[-1] == 16
    assert agent.predictions_total == 8 * 16 + 4 * 8 + 16
    assert sum(w.count for w in closed) + agent.window_count() == agent.predictions_total
    assert all(w.count >= 40 for w in closed)


def test_runner_keeps_its_buffers_and_litert_refuses_to_resize_under_it() -> None:
    """A runner made on temporary arrays keeps them alive; while a batch runner holds the batch
    interpreter's tensors, LiteRT refuses to resize it, and after close it may."""
    import gc

    from device_agent.agent import Agent, Prediction
    from device_agent.windows import Window

    agent = Agent(_bundles()["elements"](), runtime="litert")
    m = agent.model
    r = kernels.Runner(
        lambda: None,
        np.zeros(64, np.int8),
        np.full(10, 5, np.int8),
        (8, 8, 1),
        0.1,
        0.0,
        -128,
        127,
        np.arange(256, dtype=np.float32),
        1,
    )
    gc.collect()
    w = Window(m.spec, m.ref, 0.0, 0.0)
    assert w.bind(r, threading.Lock(), Prediction, tuple(m.manifest.labels), m.ref)
    got = r.predict(_inputs("elements", 1)[0])
    assert got is not None and got.outputs.tolist() == [[5.0] * 10] and w.count == 1
    r.close()
    assert r.predict(_inputs("elements", 1)[0]) is None
    with pytest.raises(RuntimeError, match="closed"):
        w.bind(r, threading.Lock(), Prediction, tuple(m.manifest.labels), m.ref)

    pred = m.predictor
    x = _inputs("elements", 8)
    agent.predict(x)  # sizes the batch interpreter for 8
    runner = pred.batch_runner(8)
    assert runner is not None and runner.batch == 8
    with pytest.raises(RuntimeError):
        pred.model.run(pred.encode_checked(x[:4]))  # a resize with the views alive
    pred.close_batch_runner()
    assert pred.model.run(pred.encode_checked(x[:4])).shape == (4, 10)


def test_no_runner_without_the_wrappers_invoke(monkeypatch: pytest.MonkeyPatch) -> None:
    """A LiteRT build whose interpreter has no wrapper ``Invoke`` gets no runner: the held views
    would make every ``Interpreter.invoke`` refuse to run."""
    from device_agent.agent import Agent

    agent = Agent(_bundles()["elements"](), runtime="litert")
    model = agent.model.predictor.model
    assert model.direct_io() is not None
    monkeypatch.setattr(model._interp, "_interpreter", object())
    assert model.direct_io() is None
