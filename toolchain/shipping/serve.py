"""``edgefleet serve``: a small HTTP server for bundles, with Range requests so devices resume downloads.

It serves only what a device fetches: ``manifest.json``, ``manifest.sig`` and the files the manifest
lists, read-only. ``DIR`` is one bundle (served at ``/``) or a folder of bundles (each at
``/<folder>/``). Any web server that serves the bundle folder's files (with Range support, for
resuming) works the same; this one is for a laptop, a lab, or a test.
"""

from __future__ import annotations

import os
import re
import threading
import urllib.parse
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from device_agent.formats.manifest import MANIFEST_FILE, SIGNATURE_FILE, BundleError, load_manifest
from toolchain.errors import ToolchainError

COPY_CHUNK_BYTES = 64 * 1024


class ServeError(ToolchainError):
    """The folder to serve holds no bundle, or the address cannot be bound."""


def bundle_map(root: str | os.PathLike[str]) -> dict[str, Path]:
    """Return URL prefix -> bundle folder for a bundle or a folder of bundles."""
    r = Path(root)
    if not r.is_dir():
        raise ServeError(f"{str(r)!r} is not a folder; pass a bundle folder or a folder of bundles")
    if (r / MANIFEST_FILE).is_file():
        return {"": r}
    found = {p.name: p for p in sorted(r.iterdir()) if p.is_dir() and (p / MANIFEST_FILE).is_file()}
    if not found:
        raise ServeError(
            f"no bundle (folder with manifest.json) in {str(r)!r}; build one with 'edgefleet build'"
        )
    return found


def _allowed_files(bundle: Path) -> set[str]:
    try:
        m = load_manifest(bundle)
    except BundleError:
        return {MANIFEST_FILE, SIGNATURE_FILE}  # a device then refuses the manifest with the reason
    return {MANIFEST_FILE, SIGNATURE_FILE} | {f.path for f in m.files}


class _Handler(BaseHTTPRequestHandler):
    server: BundleHTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature from the base class
        if self.server.verbose:
            super().log_message(format, *args)

    def _resolve(self) -> Path | None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        for prefix, bundle in self.server.bundles.items():
            if prefix:
                if not path.startswith(prefix + "/"):
                    continue
                rel = path[len(prefix) + 1 :]
            else:
                rel = path
            if rel in _allowed_files(bundle):
                p = bundle / rel
                if p.is_file() and not p.is_symlink():
                    return p
        return None

    def do_HEAD(self) -> None:  # noqa: N802 - http.server naming
        self._serve(head=True)

    def do_GET(self) -> None:  # noqa: N802
        self._serve(head=False)

    def _serve(self, head: bool) -> None:
        p = self._resolve()
        if p is None:
            self.send_error(HTTPStatus.NOT_FOUND, "not a file of a served bundle")
            return
        size = p.stat().st_size
        start, end = 0, size - 1
        status = HTTPStatus.OK
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if not m:
                self.send_error(
                    HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE, "only 'bytes=N-[M]' ranges are served"
                )
                return
            start = int(m.group(1))
            if m.group(2):
                end = min(int(m.group(2)), size - 1)
            if start >= size or start > end:
                self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
                self.send_header("Content-Range", f"bytes */{size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = HTTPStatus.PARTIAL_CONTENT
        length = end - start + 1 if size else 0
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        self.send_header("Accept-Ranges", "bytes")
        if status == HTTPStatus.PARTIAL_CONTENT:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if head:
            return
        with open(p, "rb") as fh:
            fh.seek(start)
            left = length
            while left > 0:
                chunk = fh.read(min(COPY_CHUNK_BYTES, left))
                if not chunk:
                    break
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return
                left -= len(chunk)


class BundleHTTPServer(ThreadingHTTPServer):
    """A threading HTTP server bound to one bundle or a folder of bundles."""

    daemon_threads = True

    def __init__(
        self, root: str | os.PathLike[str], host: str = "127.0.0.1", port: int = 0, verbose: bool = False
    ):
        self.bundles = bundle_map(root)
        self.verbose = verbose
        try:
            super().__init__((host, port), _Handler)
        except OSError as e:
            raise ServeError(
                f"cannot listen on {host}:{port} ({e.strerror}); choose another --port"
            ) from None

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def url(self, host: str | None = None) -> str:
        """Return the base URL of the first bundle (what goes into a deploy command)."""
        h = host or str(self.server_address[0])
        prefix = next(iter(self.bundles))
        return f"http://{h}:{self.port}/" + (f"{prefix}/" if prefix else "")

    def bundle_url(self, prefix: str, host: str | None = None) -> str:
        h = host or str(self.server_address[0])
        return f"http://{h}:{self.port}/" + (f"{urllib.parse.quote(prefix)}/" if prefix else "")

    def start_background(self) -> threading.Thread:
        """Serve in a daemon thread (for ``fleet deploy`` and tests); stop with ``shutdown()``."""
        t = threading.Thread(target=self.serve_forever, name="edgefleet-serve", daemon=True)
        t.start()
        return t
