"""LiteRT adapter (``ai_edge_litert``, falling back to the older ``tflite_runtime`` wheel)."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)
EDGETPU_LIBRARY = "libedgetpu.so.1"
# LiteRT's C++ runtime prints this once per process on stderr when it makes its default delegate;
# no setting turns it off, so the first interpreters are made with fd 2 captured (see below).
XNNPACK_NOTE = b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
_note_seen = False
_note_lock = threading.Lock()


@contextlib.contextmanager
def quiet_delegate_note() -> Iterator[None]:
    """Keep LiteRT's one-time XNNPACK "INFO" line out of stderr while an interpreter is made.

    File descriptor 2 is captured for the duration; everything else written there meanwhile (from
    any thread) is written back afterwards, so nothing else is lost. Once the line has been seen,
    or with ``EDGEFLEET_DEBUG=1``, this does nothing.
    """
    global _note_seen
    if _note_seen or os.environ.get("EDGEFLEET_DEBUG") == "1":
        yield
        return
    with _note_lock:
        try:
            sys.stderr.flush()
            saved = os.dup(2)
        except (OSError, ValueError, AttributeError):  # no real fd 2 (embedded interpreters)
            yield
            return
        cap = tempfile.TemporaryFile()
        try:
            os.dup2(cap.fileno(), 2)
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            cap.seek(0)
            lines = cap.read().splitlines(keepends=True)
            cap.close()
            kept = [ln for ln in lines if XNNPACK_NOTE not in ln]
            if len(kept) < len(lines):
                _note_seen = True
            if kept:
                with contextlib.suppress(OSError):
                    os.write(2, b"".join(kept))


def new_interpreter(mod: Any, **kwargs: Any) -> Any:
    """Return ``mod.Interpreter(**kwargs)`` with its tensors allocated, without LiteRT's XNNPACK note."""
    with quiet_delegate_note():
        interp = mod.Interpreter(**kwargs)
        interp.allocate_tensors()
    return interp


def xnnpack_refusal(e: RuntimeError, path: Path) -> Exception:
    """Return one clear line for XNNPACK refusing ``path`` (else ``e`` as it was).

    LiteRT's message runs two of its log lines together ("failed to create XNNPACK runtimeNode number
    4 (TfLiteXNNPackDelegate) failed to prepare."). XNNPACK's int8 kernels refuse some quantization
    scales, such as a fully-connected layer whose output scale is 256 or more times smaller than its
    input scale times its weight scale: a layer on raw inputs of very different units.
    """
    import re

    from device_agent.runtimes import RuntimeError_

    text = str(e)
    if "XNNPACK" not in text and "XNNPack" not in text:
        return e
    node = re.search(r"Node number (\d+)", text)
    where = f"node {node.group(1)} of {path.name}" if node else path.name
    return RuntimeError_(
        f"XNNPACK refuses {where}: an int8 layer's output range is tiny next to its inputs times its"
        " weights (raw features of very different units?); put a Normalization layer first (as"
        " 'edgefleet train' does) or build for x86"
    )


def interpreter_module() -> Any:
    """Return the LiteRT interpreter module installed here (ai_edge_litert, else tflite_runtime)."""
    try:
        from ai_edge_litert import interpreter as mod
    except ImportError:  # older Raspberry Pi OS images only have tflite-runtime
        from tflite_runtime import interpreter as mod
    return mod


def _invoke_of(interp: Any) -> Callable[[], Any]:
    """An interpreter's wrapper ``Invoke``: what ``Interpreter.invoke`` calls after checking that
    no numpy view of a tensor is alive (``tflite_runtime`` and ``ai_edge_litert`` both have it;
    ``invoke`` where a build does not)."""
    return getattr(getattr(interp, "_interpreter", None), "Invoke", None) or interp.invoke


class LiteRTModel:
    """A .tflite model in a LiteRT interpreter (optionally on the Edge TPU delegate)."""

    runtime = "litert"

    def __init__(self, path: Path, threads: int = 1, accelerator_path: Path | None = None) -> None:
        mod = interpreter_module()
        self.accelerated = False
        interp = None
        if accelerator_path is not None:
            try:
                delegate = mod.load_delegate(EDGETPU_LIBRARY)
                interp = new_interpreter(
                    mod,
                    model_path=str(accelerator_path),
                    experimental_delegates=[delegate],
                    num_threads=threads,
                )
                self.accelerated = True
            except (ValueError, OSError, RuntimeError) as e:
                log.warning(
                    "Edge TPU delegate %s not usable (%s); running the CPU int8 model", EDGETPU_LIBRARY, e
                )
        if interp is None:
            try:
                interp = new_interpreter(mod, model_path=str(path), num_threads=threads)
            except RuntimeError as e:
                raise xnnpack_refusal(e, Path(path)) from None
        self._interp = interp
        # ``Interpreter.invoke`` is the wrapper's ``Invoke`` after a check that no numpy view of a
        # tensor is alive (it counts references to the wrapper). A native runner holds views of
        # the tensors (``direct_io``), which that check would count, while a run does not move
        # them: so runs call ``Invoke`` directly, and only resizing stays guarded.
        self._run_invoke: Callable[[], Any] = _invoke_of(interp)
        self._path, self._threads, self._mod = path, threads, mod
        # Batches of another size run on a second interpreter, made on the first such batch and
        # resized as sizes change: the first keeps its size, so single samples between batches
        # never pay for re-allocating tensors (an Edge TPU model is batch 1: sample by sample).
        self._batch_interp: Any = None
        self._batch_n = 0
        self._batch_ok = not self.accelerated
        inp = self._interp.get_input_details()[0]
        out = self._interp.get_output_details()[0]
        self._in_index = inp["index"]
        self._out_index = out["index"]
        sig = inp.get("shape_signature", inp["shape"])
        self.input_shape = tuple(int(d) for d in sig)
        self.input_dtype = np.dtype(inp["dtype"])
        self.output_dtype = np.dtype(out["dtype"])
        self._batch = int(inp["shape"][0])

    def run(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        if n == self._batch:
            return self._invoke(x)
        if self._batch_ok:
            try:
                return self._invoke_batch(x)
            except (RuntimeError, ValueError) as e:  # a graph with a fixed batch size
                if "internal data" in str(e):  # a kernels.Runner still holds this interpreter: a bug
                    raise
                log.info("running batches sample by sample: the model does not resize (%s)", e)
                self._batch_ok = False
                self._batch_interp = None
        return np.concatenate([self._invoke(x[i : i + 1]) for i in range(n)], axis=0)

    def _invoke(self, x: np.ndarray) -> np.ndarray:
        self._interp.set_tensor(self._in_index, x)
        self._run_invoke()
        return self._interp.get_tensor(self._out_index)  # a copy already (tensor() would be a view)

    def direct_io(self, batch: int = 1) -> tuple[Callable[[], Any], np.ndarray, np.ndarray] | None:
        """An interpreter's ``Invoke`` and views of its input and output tensor memory, for
        ``device_agent.kernels.Runner``, which holds them until it is closed. While views are
        alive LiteRT refuses ``Interpreter.invoke``, ``resize_tensor_input`` and
        ``allocate_tensors`` on that interpreter (a reference-count check); this adapter runs the
        single-sample interpreter through ``Invoke`` itself, and never resizes it.

        ``batch`` 1 (the model's own size) is the single-sample interpreter; another size is the
        batch interpreter when it has that size now. ``run`` resizes that one for other sizes: its
        runner must be closed before (the Agent closes it before any batch goes the general way;
        if it were not, the resize would raise instead of moving memory under the runner). None
        when there is no such interpreter, or a run moves the tensors (dynamic shapes).
        """
        if batch == self._batch:
            it = self._interp
        elif self._batch_interp is not None and self._batch_n == batch:
            it = self._batch_interp
        else:
            return None
        invoke = _invoke_of(it)
        if invoke == it.invoke:  # no wrapper Invoke: held views would stop every run
            return None

        def where() -> tuple[int, int]:
            return it.tensor(self._in_index)().ctypes.data, it.tensor(self._out_index)().ctypes.data

        before = where()
        invoke()
        if where() != before:
            return None
        return invoke, it.tensor(self._in_index)(), it.tensor(self._out_index)()

    def _invoke_batch(self, x: np.ndarray) -> np.ndarray:
        n = x.shape[0]
        it = self._batch_interp
        if it is None:
            with quiet_delegate_note():
                it = self._mod.Interpreter(model_path=str(self._path), num_threads=self._threads)
        if n != self._batch_n or it is not self._batch_interp:
            it.resize_tensor_input(self._in_index, [n, *x.shape[1:]], strict=False)
            it.allocate_tensors()
            self._batch_interp, self._batch_n = it, n
        it.set_tensor(self._in_index, x)
        # The wrapper's Invoke, as for single samples: a batch runner of this size may hold views
        # of these tensors (a run does not move them; only the resize above is guarded). Looked up
        # per run, not kept: a kept bound Invoke would count against that resize check.
        _invoke_of(it)()
        return it.get_tensor(self._out_index)

    def ops(self) -> list[dict[str, Any]]:
        """Return the interpreter's op list (name, inputs, outputs) for inspection."""
        return list(self._interp._get_ops_details())

    def tensors(self) -> list[dict[str, Any]]:
        """Return every tensor's details (name, dtype, shape, quantization)."""
        return list(self._interp.get_tensor_details())


def load(
    path: Path, threads: int = 1, accelerator_path: Path | None = None, precision: str | None = None
) -> LiteRTModel:
    """Load a .tflite model (LiteRT computes in the model's own types: no precision to pin)."""
    return LiteRTModel(path, threads=threads, accelerator_path=accelerator_path)
