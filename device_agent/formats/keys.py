"""Trusted signing keys on the device: Ed25519 public keys in PEM files, loaded to raw 32 bytes.

Key files on disk (written by ``edgefleet keys create``):

* ``NAME.pub``: the public key, PEM ``SubjectPublicKeyInfo`` (``-----BEGIN PUBLIC KEY-----``). This is
  what a device trusts: list it in ``[agent] trusted_keys``. ``openssl pkey -pubout`` writes the same.
* ``NAME.key``: the private key, PEM ``PKCS8`` unencrypted (``-----BEGIN PRIVATE KEY-----``), mode 0600.
  It stays on the build host; a device never needs it.

A trusted key file that group or others may write (mode 0666 under ``umask 000``) is refused: whoever
can replace it decides which bundles the device accepts.

No toolchain import here: the agent installs with ``cryptography`` and numpy only.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterable
from pathlib import Path

from device_agent.errors import AgentError
from device_agent.formats.files import FileTooLargeError, read_bounded

PUBLIC_KEY_MAX_BYTES = 16 * 1024


class KeyFileError(AgentError):
    """A key file is missing, unreadable, or not an Ed25519 key in the expected PEM form."""


def parse_public_key(data: bytes, where: str = "public key") -> bytes:
    """Return the raw 32-byte Ed25519 public key from PEM (SubjectPublicKeyInfo) bytes."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

    if b"PRIVATE KEY" in data:
        raise KeyFileError(
            f"{where} holds a PRIVATE key; give the device the .pub file written by 'edgefleet keys create'"
        )
    try:
        key = load_pem_public_key(data)
    except (ValueError, TypeError):
        raise KeyFileError(
            f"{where} is not a PEM public key (-----BEGIN PUBLIC KEY-----); use the .pub file written by"
            " 'edgefleet keys create'"
        ) from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(
            f"{where} is a {type(key).__name__}, not an Ed25519 key; create one with 'edgefleet keys create'"
        )
    return key.public_bytes(Encoding.Raw, PublicFormat.Raw)


def load_public_key_file(path: str | os.PathLike[str]) -> bytes:
    """Read one PEM public key file and return the raw 32-byte Ed25519 key."""
    p = Path(path)
    try:
        data = read_bounded(p, PUBLIC_KEY_MAX_BYTES)
        mode = stat.S_IMODE(p.stat().st_mode)
        if mode & 0o022:
            raise KeyFileError(
                f"trusted key file {str(p)!r} can be changed by group or others (mode {mode:04o}), so anyone"
                f" could make the device trust their bundles; run 'chmod 644 {p}'"
            )
    except FileTooLargeError:
        raise KeyFileError(
            f"trusted key file {str(p)!r} is larger than {PUBLIC_KEY_MAX_BYTES} bytes; is it a key?"
        ) from None
    except FileNotFoundError:
        raise KeyFileError(
            f"trusted key file {str(p)!r} does not exist; copy the .pub file from 'edgefleet keys create' there"
        ) from None
    except IsADirectoryError:
        raise KeyFileError(f"trusted key file {str(p)!r} is a directory; name the .pub file itself") from None
    except OSError as e:
        raise KeyFileError(f"cannot read trusted key file {str(p)!r} ({e.strerror})") from None
    return parse_public_key(data, f"trusted key file {str(p)!r}")


def load_trusted_keys(paths: Iterable[str | os.PathLike[str]]) -> tuple[bytes, ...]:
    """Load every trusted public key file; return their raw 32-byte keys without duplicates, in order."""
    out: list[bytes] = []
    for path in paths:
        raw = load_public_key_file(path)
        if raw not in out:
            out.append(raw)
    return tuple(out)


__all__ = [
    "KeyFileError",
    "parse_public_key",
    "load_public_key_file",
    "load_trusted_keys",
    "PUBLIC_KEY_MAX_BYTES",
]
