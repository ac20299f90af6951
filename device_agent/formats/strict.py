"""The one strict-keys validator and the one bounded integer check every decoder uses.

Payloads, manifests, deploy commands, the agent's TOML tables, the API's JSON bodies and the host's
target profiles all refuse unknown keys and name missing ones. Each keeps its own wording (people
and tests read them), given as a format string with these fields:

``{where}`` the place, ``{extra}`` the first five unknown keys as a sorted list, ``{extra_names}``
the same comma-separated, ``{missing}`` the missing keys as a sorted list, ``{known}`` every allowed
key comma-separated in the order given, ``{allowed}`` every allowed key as a sorted list.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

UNKNOWN = "{where} has unknown key(s) {extra}"
MISSING = "{where} is missing key(s) {missing}"
NOT_MAPPING = "{where} must be an object"
EXTRA_SHOWN = 5  # unknown keys named in a message (the payload is untrusted; the message stays short)

ErrorFactory = Callable[[str], BaseException]


def check_keys(
    d: Any,
    required: Iterable[str],
    optional: Iterable[str] = (),
    where: str = "document",
    *,
    error: ErrorFactory,
    unknown: str = UNKNOWN,
    missing: str = MISSING,
    not_mapping: str = NOT_MAPPING,
) -> Mapping[str, Any]:
    """Return ``d`` when it is a mapping with every ``required`` key and no key outside ``required`` and
    ``optional``; else raise ``error(message)`` (unknown keys are reported before missing ones)."""
    if not isinstance(d, Mapping):
        raise error(not_mapping.format(where=where))
    req, opt = list(required), list(optional)
    known = req + [k for k in opt if k not in req]
    extra = sorted(set(d) - set(known))
    if extra:
        raise error(
            unknown.format(
                where=where,
                extra=extra[:EXTRA_SHOWN],
                extra_names=", ".join(extra[:EXTRA_SHOWN]),
                known=", ".join(known),
                allowed=sorted(known),
            )
        )
    lacking = sorted(set(req) - set(d))
    if lacking:
        raise error(missing.format(where=where, missing=lacking))
    return d


def bounded_int(
    v: Any,
    what: str,
    minimum: int = 0,
    maximum: int = 2**63 - 1,
    *,
    error: ErrorFactory,
    message: str = "{what} must be an integer in [{minimum}, {maximum}], got {value!r}",
) -> int:
    """Return ``v`` when it is an int (not a bool) within ``[minimum, maximum]``; else raise ``error``."""
    if isinstance(v, bool) or not isinstance(v, int) or not minimum <= v <= maximum:
        raise error(message.format(what=what, minimum=minimum, maximum=maximum, value=str(v)[:20]))
    return v


__all__ = ["check_keys", "bounded_int", "UNKNOWN", "MISSING", "NOT_MAPPING"]
