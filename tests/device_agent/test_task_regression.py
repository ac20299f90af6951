"""The manifest's regression task: strict keys, one finite non-zero scale and an offset per target."""

from __future__ import annotations

import pytest

from device_agent.formats.manifest import BundleError, check_task


def test_a_regression_task_is_checked_strictly() -> None:
    check_task({"type": "regression", "scale": [780.1, 0.3], "offset": [2476.7, 0.72]})
    bad = [
        ({"type": "regression", "scale": [1.0]}, "task"),
        ({"type": "regression", "scale": [1.0], "offset": [0.0], "extra": 1}, "task"),
        ({"type": "regression", "scale": [], "offset": []}, "non-empty"),
        ({"type": "regression", "scale": [1.0, 2.0], "offset": [0.0]}, "one number per target"),
        ({"type": "regression", "scale": [0.0], "offset": [0.0]}, "must not hold 0"),
        ({"type": "regression", "scale": [float("nan")], "offset": [0.0]}, "finite"),
        ({"type": "regression", "scale": ["1"], "offset": [0.0]}, "finite"),
    ]
    for task, msg in bad:
        with pytest.raises(BundleError, match=msg):
            check_task(task)
