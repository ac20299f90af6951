"""Import TensorFlow the one way that works with tfmot: legacy Keras 2 (tf_keras) first."""

from __future__ import annotations

import os
from typing import Any


def import_tf() -> Any:
    """Return the ``tensorflow`` module with ``TF_USE_LEGACY_KERAS=1`` set before its first import."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    return tf


def import_keras() -> Any:
    """Return ``tf_keras`` (Keras 2), the only Keras that tfmot's pruning and QAT accept."""
    import_tf()
    import tf_keras

    return tf_keras
