"""Request bodies of the local API: JSON (a fast path for flat numeric arrays, orjson when installed),
``.npy`` and raw tensor bytes; ``BadBody`` says what is wrong and which schema violation it counts as."""

from __future__ import annotations

import io
import json
import re
from typing import Any

import numpy as np

from device_agent import kernels
from device_agent.formats.strict import check_keys

_orjson: Any
try:  # optional: a faster JSON parser (pip install orjson); the stdlib's json is the fallback
    import orjson as _orjson
except ImportError:  # pragma: no cover - depends on the install
    _orjson = None

RAW_DTYPES = ("float32", "float64", "float16", "uint8", "int8", "int16", "int32")
_JSON_HEAD = re.compile(rb'\A\s*\{\s*"inputs"\s*:\s*')
_NUMBER_CHARS = b"0123456789.eE+- \t\r\n"


def _dumps(doc: Any) -> bytes:
    if _orjson is not None:
        return bytes(_orjson.dumps(doc)) + b"\n"
    return (json.dumps(doc, separators=(",", ":")) + "\n").encode()


def _loads(raw: bytes) -> Any:
    return _orjson.loads(raw) if _orjson is not None else json.loads(raw)


class BadBody(ValueError):
    """A request body that cannot be decoded; ``kind`` is the schema-violation kind it counts as."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def json_depth(raw: bytes) -> int:
    """Return the deepest nesting of ``[``/``{`` in ``raw`` (brackets inside strings count too: an
    over-estimate, which only matters for bodies the API refuses anyway)."""
    a = np.frombuffer(raw, dtype=np.uint8)
    step = (a == 0x5B).view(np.int8) + (a == 0x7B).view(np.int8) - (a == 0x5D).view(np.int8)
    step -= (a == 0x7D).view(np.int8)
    return int(np.cumsum(step, dtype=np.int64).max(initial=0))


def _skeleton(shape: tuple[int, ...]) -> bytes:
    """The brackets and commas of a rectangular JSON array of ``shape`` (numbers left out)."""
    s = b"[" + b"," * (shape[-1] - 1) + b"]" if shape[-1] > 0 else b"[]"
    for n in reversed(shape[:-1]):
        s = b"[" + b",".join([s] * n) + b"]"
    return s


class JsonInputs:
    """Decode ``{"inputs": X}`` bodies, with a fast path for rectangular arrays of plain numbers.

    The fast path checks the body's brackets and commas against those of an array of the model's
    sample shape (or a batch of them), then parses the numbers as one flat list, so the nested lists
    are never built: with the C kernels (``kernels.parse_floats``) straight into the float32 array,
    each number rounded as ``json.loads`` and ``numpy.asarray(..., float32)`` round it, else through
    orjson. Anything else (other shapes, ragged lists, strings, NaN) takes the general path,
    which refuses it with the agent's own message.
    """

    def __init__(self, max_depth: int) -> None:
        self.max_depth = max_depth
        self._cache: dict[tuple[int, ...], bytes] = {}

    def _expected(self, shape: tuple[int, ...]) -> bytes:
        sk = self._cache.get(shape)
        if sk is None:
            if len(self._cache) > 8:
                self._cache.clear()
            sk = self._cache[shape] = _skeleton(shape)
        return sk

    def fast(self, raw: bytes, sample_shape: tuple[int, ...]) -> np.ndarray | None:
        """A float32 array for a rectangular all-numbers body of the model's shape, else None."""
        head = _JSON_HEAD.match(raw)
        if head is None or not sample_shape or min(sample_shape) < 1:
            return None
        end = len(raw) if raw.endswith(b"}") else len(raw.rstrip())  # no copy in the usual case
        if raw[end - 1 : end] != b"}":
            return None
        mid = raw[head.end() : end - 1]
        # Only brackets and commas are left; anything else (strings, NaN, true, null, objects) makes
        # it differ from the expected skeleton below, and the general path takes the body.
        sk = mid.translate(None, _NUMBER_CHARS)
        depth = len(sk) - len(sk.lstrip(b"["))
        one = self._expected(sample_shape)
        if depth == len(sample_shape):
            shape = sample_shape
            if sk != one:
                return None
        elif depth == len(sample_shape) + 1:
            n, rem = divmod(len(sk) - 1, len(one) + 1)
            if rem or n < 1 or sk != b"[" + b",".join([one] * n) + b"]":
                return None
            shape = (n, *sample_shape)
        else:
            return None
        parse = kernels.parse_floats
        if parse is not None:  # the numbers straight into the array (C); -1: orjson decides below
            arr = np.empty(shape, dtype=np.float32)
            if parse(mid, arr) == arr.size:
                return arr
        flat = mid.translate(None, b"[]")
        try:
            values = _loads(b"[" + flat + b"]")
        except ValueError:
            return None  # "1,,2", "--1": the general path says what is wrong
        try:
            arr = np.asarray(values, dtype=np.float32)
        except (TypeError, ValueError, OverflowError):
            return None
        if arr.size != int(np.prod(shape)):
            return None
        return arr.reshape(shape)

    def general(self, raw: bytes) -> Any:
        """Parse any JSON body (depth-limited); return its ``inputs``; BadBody when it is not valid."""
        if raw.count(b"[") + raw.count(b"{") > self.max_depth and json_depth(raw) > self.max_depth:
            raise BadBody("json", f"JSON nested deeper than {self.max_depth} levels ([api] max_json_depth)")
        try:
            doc = json.loads(raw)  # the stdlib: it accepts NaN, which the agent then refuses as "nan"
        except RecursionError:  # pragma: no cover - the depth check above comes first
            raise BadBody("json", f"JSON nested deeper than {self.max_depth} levels") from None
        except (ValueError, UnicodeDecodeError) as e:
            raise BadBody("json", f"bad JSON: {str(e)[:200]}") from None
        if not isinstance(doc, dict) or "inputs" not in doc:
            raise BadBody("json", 'bad JSON: the body must be a JSON object {"inputs": [...]}')
        check_keys(doc, ["inputs"], (), "body", error=_bad_json, unknown=_UNKNOWN_BODY_KEYS)
        return doc["inputs"]


_UNKNOWN_BODY_KEYS = 'bad JSON: unknown key(s) {extra}; the body is {{"inputs": [...]}}'


def _bad_json(message: str) -> BadBody:
    return BadBody("json", message)


def load_npy(raw: bytes) -> np.ndarray:
    """Decode an ``application/x-npy`` body (no pickles); BadBody when it is not a numeric .npy."""
    try:
        arr = np.load(io.BytesIO(raw), allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise BadBody("body", f"bad .npy body: {str(e)[:200]}") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "fiu":
        raise BadBody("dtype", f"the .npy body holds {getattr(arr, 'dtype', type(arr))}, not numbers")
    return arr


_RAW_HEADERS: dict[tuple[str, str], tuple[tuple[int, ...], np.dtype[Any], int]] = {}


def load_raw(raw: bytes, shape_h: str | None, dtype_h: str | None) -> np.ndarray:
    """Decode raw little-endian tensor bytes with ``X-Shape: 1,96,96,1`` and ``X-Dtype`` (default float32)."""
    if not shape_h:
        raise BadBody("body", "raw tensor bodies need an X-Shape header, e.g. X-Shape: 1,96,96,1")
    key = (shape_h, dtype_h or "float32")
    known = _RAW_HEADERS.get(key)
    if known is None:
        try:
            shape = tuple(int(d) for d in shape_h.replace("x", ",").split(","))
        except ValueError:
            raise BadBody(
                "shape", f"X-Shape {shape_h[:60]!r} must be comma-separated sizes, e.g. 1,96,96,1"
            ) from None
        if not shape or len(shape) > 8 or min(shape) < 1:
            raise BadBody("shape", f"X-Shape {shape_h[:60]!r} must be 1 to 8 sizes of at least 1")
        name = key[1].strip().lower()
        if name not in RAW_DTYPES:
            raise BadBody("dtype", f"X-Dtype {name[:20]!r} is not one of {', '.join(RAW_DTYPES)}")
        dt = np.dtype(name).newbyteorder("<")
        known = (shape, dt, int(np.prod(shape)) * dt.itemsize)
        if len(_RAW_HEADERS) > 64:
            _RAW_HEADERS.clear()
        _RAW_HEADERS[key] = known
    shape, dt, want = known
    if len(raw) != want:
        raise BadBody(
            "shape", f"X-Shape {shape_h[:60]} of {dt.name} needs {want} bytes, the body has {len(raw)}"
        )
    arr = np.frombuffer(raw, dtype=dt).reshape(shape)
    return arr if dt.isnative else arr.astype(dt.newbyteorder("="))
