"""Text from devices made safe for a terminal: control characters are shown, never obeyed.

A device reports free text (``agent_version``, deployment states, refusal reasons). Printed as is, a
``\\r`` rewrites the line the operator reads, ``\\n`` forges table rows, and escape sequences move the
cursor, change colours or set the window title. ``safe_text`` shows each such character as a visible
escape (``\\r``, ``\\x1b``, ``\\u202e``), the way ``repr`` would, and leaves everything else as it is.
"""

from __future__ import annotations

import re
from typing import Any

# C0 controls and DEL, C1 controls, and the bidirectional overrides/isolates that reorder what is shown
# ("Trojan Source"); line and paragraph separators.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(m: re.Match[str]) -> str:
    ch = m.group(0)
    if ch in _NAMED:
        return _NAMED[ch]
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_text(value: Any) -> Any:
    """Return ``value`` with control characters escaped when it is a string; anything else unchanged."""
    if isinstance(value, str):
        return _UNSAFE.sub(_escape, value)
    return value
