"""Import TensorFlow the one way that works with tfmot: legacy Keras 2 (tf_keras) first.

TensorFlow's C++ side writes start-up chatter (oneDNN notes, "no CUDA driver") straight to file
descriptor 2 before its own log settings apply, so the first import runs with fds 1 and 2 sent to a
log file; ``EDGEFLEET_DEBUG=1`` (or ``edgefleet --debug``) shows everything instead.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import Any

NATIVE_LOG = os.path.join(tempfile.gettempdir(), "edgefleet-native.log")
_terminal: Any = None  # the real stderr while native_quiet() is active


def terminal_stderr() -> Any:
    """Return a stream to the real terminal's stderr, even inside native_quiet() (for progress bars)."""
    return _terminal if _terminal is not None else sys.stderr


@contextlib.contextmanager
def native_quiet() -> Iterator[None]:
    """Send native (C/C++) writes to fds 1 and 2 to NATIVE_LOG for the duration, unless debugging."""
    if os.environ.get("EDGEFLEET_DEBUG") == "1":
        yield
        return
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        saved = (os.dup(1), os.dup(2))
    except (OSError, ValueError, AttributeError):  # no real fds (embedded interpreters, some test runners)
        yield
        return
    global _terminal
    log_fd = os.open(NATIVE_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    outer = _terminal
    try:
        if outer is None:
            _terminal = os.fdopen(os.dup(saved[1]), "w", buffering=1)
        os.dup2(log_fd, 1)
        os.dup2(log_fd, 2)
        yield
    finally:
        if outer is None and _terminal is not None:
            with contextlib.suppress(OSError, ValueError):
                _terminal.close()
            _terminal = None
        with contextlib.suppress(OSError, ValueError):
            sys.stdout.flush()
            sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, log_fd):
            os.close(fd)


def import_tf() -> Any:
    """Return the ``tensorflow`` module with ``TF_USE_LEGACY_KERAS=1`` set before its first import."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if "tensorflow" in sys.modules:
        return sys.modules["tensorflow"]
    with native_quiet():
        import tensorflow as tf

        tf.config.list_physical_devices()  # triggers the CUDA probe and its error line while quiet
    return tf


def import_keras() -> Any:
    """Return ``tf_keras`` (Keras 2), the only Keras that tfmot's pruning and QAT accept."""
    import_tf()
    import tf_keras

    return tf_keras
