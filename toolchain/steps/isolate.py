"""Run a TensorFlow-heavy conversion in a child process, so its memory goes back when it ends.

TensorFlow does not give memory back to the system: the TFLite converter (MLIR passes, its
calibrator), tf2onnx's graph rewriting and the traced functions they make stay in the process's heap
after the conversion returns, and the next target's conversion stacks on top. For large models (a
MobileNetV2 1.0 at 224x224x3 peaked at 9.4 GB before this) each conversion runs in a fresh Python
process instead: the parent writes the calibration data to an ``.npy`` file, the child memory-maps
it, loads the model from its file (``ModelFile``), runs the back end and writes the artifact; the
parent reads nothing back but the artifact and a small result file.

Only a model that can be re-made from its file goes to a child: the model as given, with its input
normalisation folded out when the build did that (``toolchain.steps.models.fold_input_normalization``
is deterministic). Models fine-tuned in memory (``--prune``, ``--cluster``, ``--quantize qat``) are
converted in the build's own process, as before.

``CHILD_MIN_PARAMS`` decides which models go to a child (small ones convert in a few MB and the
start-up of a child, about 5 s of TensorFlow import, would dominate); ``EDGEFLEET_BUILD_CHILD``
(``always``/``never``) overrides it. A child that fails with an edgefleet error re-raises it in the
parent, one line; a child that dies (killed, out of memory, crashed) raises ConversionError naming
its exit status and the last line it printed.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from toolchain.errors import ToolchainError

# Models with at least this many parameters convert in a child process (see the module docstring).
CHILD_MIN_PARAMS = 1_000_000
CHILD_ENV = "EDGEFLEET_BUILD_CHILD"
CHILD_MODES = ("auto", "always", "never")


@dataclass(frozen=True)
class ModelFile:
    """A model the converters can load again from its file: the file as loaded, normalisation folded
    out when ``fold`` (the build's model to convert); ``params`` is its parameter count and ``live``
    the same model in this process, when it is loaded here already."""

    path: Path
    fold: bool
    params: int
    # the same model already loaded in this process (used when converting here; never pickled)
    live: Any = field(default=None, compare=False, repr=False)

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (ModelFile, (self.path, self.fold, self.params))

    def load(self) -> Any:
        """Return the model as the converters take it (tf_keras model or SavedModel directory)."""
        from toolchain.steps.models import fold_input_normalization, load_model

        lm = load_model(self.path)
        if lm.kind != "tf_keras":
            return lm.conversion_source(Path(tempfile.mkdtemp(prefix="edgefleet-child-")))
        return fold_input_normalization(lm.model)[0] if self.fold else lm.model


def release_memory() -> None:
    """Collect garbage and hand freed heap pages back to the system (glibc ``malloc_trim``).

    Called between the build's steps: runtimes, interpreters and TensorFlow tensors freed by one step
    otherwise stay in the process's heap (counted in its RSS) while the next one allocates its own.
    """
    import ctypes
    import gc

    gc.collect()
    if not sys.platform.startswith("linux"):
        return
    try:
        # the process's own symbols (ctypes.util.find_library would fork ldconfig, doubling the RSS
        # a process-tree measurement sees for a moment)
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (musl has no malloc_trim)
        pass


def child_mode() -> str:
    """Return ``auto``, ``always`` or ``never`` from ``EDGEFLEET_BUILD_CHILD``; refuse anything else."""
    mode = os.environ.get(CHILD_ENV, "auto").strip().lower() or "auto"
    if mode not in CHILD_MODES:
        raise ToolchainError(f"{CHILD_ENV}={mode!r} is unknown. Known: {', '.join(CHILD_MODES)}")
    return mode


def in_child(model: Any) -> bool:
    """Return True when converting ``model`` should run in a child process."""
    if not isinstance(model, ModelFile):
        return False
    mode = child_mode()
    return mode == "always" or (mode == "auto" and model.params >= CHILD_MIN_PARAMS)


def resolve(model: Any) -> Any:
    """Return ``model`` ready to convert in this process (a ``ModelFile`` is loaded)."""
    if not isinstance(model, ModelFile):
        return model
    return model.live if model.live is not None else model.load()


def run_backend(
    spec: str, model: ModelFile, args: tuple[Any, ...], kwargs: dict[str, Any], what: str
) -> None:
    """Run the back end ``spec`` (``module:function``) as ``f(model, *args, **kwargs)`` in a child.

    A numpy array among ``args`` travels as a memory-mapped ``.npy`` file. Raises the child's
    edgefleet error as it was, or ConversionError when the child died.
    """
    from toolchain.steps.artifact import ConversionError

    with tempfile.TemporaryDirectory(prefix="edgefleet-child-") as tmp:
        sent: list[Any] = []
        for i, a in enumerate(args):
            if isinstance(a, np.ndarray):
                p = Path(tmp) / f"arg{i}.npy"
                np.save(p, a)
                sent.append(("npy", str(p)))
            else:
                sent.append(("value", a))
        job, result = Path(tmp) / "job.pkl", Path(tmp) / "result.pkl"
        job.write_bytes(pickle.dumps((spec, model, sent, kwargs)))
        proc = subprocess.run(
            [sys.executable, "-m", "toolchain.steps.isolate", str(job), str(result)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            check=False,
        )
        if result.is_file():
            status, payload = pickle.loads(result.read_bytes())
            if status == "ok":
                return
            raise _rebuild_error(payload)
        raise ConversionError(f"the child process converting {what} {_death(proc.returncode, proc.stderr)}")


def _death(rc: int, stderr: str) -> str:
    """Return why a child ended without a result, in words (signal, exit code, its last line)."""
    if rc < 0:
        import signal

        name = signal.Signals(-rc).name if -rc in signal.Signals._value2member_map_ else str(-rc)
        why = f"was killed by {name}" + (" (out of memory?)" if name == "SIGKILL" else "")
    else:
        why = f"exited with code {rc} without a result"
    lines = [ln.strip() for ln in (stderr or "").splitlines() if ln.strip()]
    last = f"; last line: {lines[-1][:200]}" if lines else ""
    return f"{why}{last}; run with {CHILD_ENV}=never to convert in the build's own process"


def _rebuild_error(payload: tuple[str, str, str]) -> BaseException:
    """Return the child's error as the same edgefleet error class (ConversionError when unknown)."""
    import importlib

    from toolchain.steps.artifact import ConversionError

    module, name, message = payload
    try:
        cls = getattr(importlib.import_module(module), name)
        if isinstance(cls, type) and issubclass(cls, ToolchainError):
            return cls(message)
    except (ImportError, AttributeError, TypeError):
        pass
    return ConversionError(message)


def _child(job: Path, result: Path) -> int:
    """The child's side: load the job, run it, write ``("ok", None)`` or ``("error", (module, class, msg))``."""
    out: tuple[str, Any]
    try:
        spec, model, sent, kwargs = pickle.loads(job.read_bytes())
        args = [np.load(v, mmap_mode="r") if kind == "npy" else v for kind, v in sent]
        import importlib

        module, func = spec.split(":")
        getattr(importlib.import_module(module), func)(model.load(), *args, **kwargs)
        out = ("ok", None)
    except ToolchainError as e:
        out = ("error", (type(e).__module__, type(e).__name__, str(e)))
    except Exception as e:  # noqa: BLE001 - any failure becomes one line in the parent
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        out = ("error", ("", "", f"{type(e).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")))
    tmp = result.with_suffix(".tmp")
    tmp.write_bytes(pickle.dumps(out))
    tmp.replace(result)
    return 0


if __name__ == "__main__":
    sys.exit(_child(Path(sys.argv[1]), Path(sys.argv[2])))
