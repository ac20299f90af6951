"""Drift on a real bundle (the digits CNN built for x86) running in its real runtime (marker slow)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from device_agent.formats.manifest import manifest_sha256
from device_agent.formats.stats import baseline_from_dict
from toolchain.fleet.drift import compare
from toolchain.fleet.queries import drift_table
from toolchain.fleet.registry import register_bundle

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real(digits_bundles, tmp_path_factory):
    from device_agent.inference import Predictor

    bundle = tmp_path_factory.mktemp("real") / "x86"
    shutil.copytree(digits_bundles / "x86", bundle)
    pred = Predictor(bundle)
    base = baseline_from_dict(json.loads((bundle / pred.manifest.baseline).read_text()))
    return bundle, pred, base


def window(pred, base, x):
    prof = base.spec.new_profile()
    prof.update_inputs(x)
    prof.update_outputs(pred.predict(x.astype(np.float32)))
    return prof


def test_class_prior_shift_and_confidence_decay_on_the_real_model(real, digits) -> None:
    _, pred, base = real
    rng = np.random.default_rng(1)
    x, y = digits["x_test"].astype(np.float64), digits["y_test"]
    held_out = compare(base, window(pred, base, x[rng.choice(len(x), 500)]))
    assert held_out.state == "ok", held_out.reasons
    w = np.where(y <= 2, 6.0, 1.0)
    prior = compare(base, window(pred, base, x[rng.choice(len(x), 500, p=w / w.sum())]))
    assert prior.output_state == "alert" and prior.class_psi is not None and prior.class_psi > 0.2
    faded = compare(base, window(pred, base, x[rng.choice(len(x), 500)] * 0.5))
    assert (
        faded.decay_state == "alert" and faded.confidence_shift is not None and faded.confidence_shift < -0.1
    )


def test_register_a_built_bundle_and_judge_its_windows(real, digits, sqlite_url) -> None:
    from device_agent.formats.telemetry import ModelRef
    from toolchain.fleet.ingest import Incoming, Ingestor
    from toolchain.fleet.registry import BaselineCache
    from toolchain.fleet.sim import stats_payload
    from toolchain.fleet.storage import open_store

    bundle, pred, base = real
    info = register_bundle(sqlite_url, bundle)
    assert info["model_sha256"] == manifest_sha256(bundle) and info["features"] == 64
    ref = ModelRef(pred.manifest.name, pred.manifest.version, info["model_sha256"])
    x = digits["x_test"].astype(np.float64)
    msgs = [
        stats_payload("pi-1", s, ref, window(pred, base, x[s * 100 : (s + 1) * 100] * 0.5)) for s in range(3)
    ]
    with open_store(sqlite_url) as s:
        Ingestor(s, BaselineCache(s)).process([Incoming(t, p, i, 1, 0, 0.0) for i, (t, p) in enumerate(msgs)])
    rows = drift_table(sqlite_url, device="pi-1", since="all")
    assert rows[0]["state"] == "alert" and rows[0]["count"] == 300
