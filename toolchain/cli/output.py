"""What every command that prints a result shares: ``--json`` output and keeping stdout clean for it.

With ``--json`` the result goes to stdout as one JSON document and nothing else does: library chatter
on file descriptor 1 is redirected to stderr while the work runs (``stdout_to_stderr``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from typing import Any

import click


@contextlib.contextmanager
def stdout_to_stderr(active: bool) -> Iterator[None]:
    """While active, send everything written to stdout (Python and C level) to stderr."""
    if not active:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def emit_json(doc: Any) -> None:
    """Print one JSON document to stdout."""
    click.echo(json.dumps(doc, indent=2, allow_nan=False))
