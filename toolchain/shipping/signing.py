"""Ed25519 signing keys and bundle signatures on the build host.

Key files (see ``device_agent.formats.keys`` for the device side):

* ``NAME.key``: PEM PKCS8, unencrypted, mode 0600 (keep it on the build host or in a secret store);
* ``NAME.pub``: PEM SubjectPublicKeyInfo, mode 0644; copy it to devices, list it in ``[agent] trusted_keys``;
* a folder that ``create_keys`` makes is 0700. The modes hold whatever the umask; a private key that
  group or others can read is refused for signing (``chmod 600`` it).

``sign_bundle`` writes ``manifest.sig`` over the exact bytes of ``manifest.json``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from device_agent.formats.keys import KeyFileError, load_public_key_file
from device_agent.formats.manifest import SIGNATURE_FILE, read_manifest_bytes, sign_manifest
from toolchain.errors import ToolchainError

PRIVATE_KEY_MAX_BYTES = 16 * 1024
KEY_DIR_MODE = 0o700
PRIVATE_KEY_MODE = 0o600
PUBLIC_KEY_MODE = 0o644
DEFAULT_KEY_NAME = "fleet"


class SigningError(ToolchainError):
    """A key cannot be created or read, or a bundle cannot be signed."""


def create_keys(
    out_dir: str | os.PathLike[str], name: str = DEFAULT_KEY_NAME, force: bool = False
) -> tuple[Path, Path]:
    """Create an Ed25519 key pair ``NAME.key`` (0600) and ``NAME.pub`` (0644) in ``out_dir``; return both paths.

    A new ``out_dir`` is made 0700; an existing one must not be writable by group or others.
    """
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        PublicFormat,
    )

    if not name or "/" in name or name.startswith("."):
        raise SigningError(f"key name {name!r} must be a plain file name such as 'fleet'")
    out = Path(out_dir)
    priv_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    if not force:
        for p in (priv_path, pub_path):
            if p.exists():
                raise SigningError(
                    f"{str(p)!r} already exists; choose another --out or --name, or pass --force"
                )
    try:
        if out.is_dir():
            mode = stat.S_IMODE(out.stat().st_mode)
            if mode & 0o022:
                raise SigningError(
                    f"key folder {str(out)!r} is writable by group or others (mode {mode:04o}), so anyone"
                    f" could swap the keys; run 'chmod 700 {out}' or choose another --out"
                )
        else:
            out.mkdir(parents=True, mode=KEY_DIR_MODE)
            os.chmod(out, KEY_DIR_MODE)  # mkdir's mode is filtered by the umask; chmod is not
        key = Ed25519PrivateKey.generate()
        priv_pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        pub_pem = key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
        _write_with_mode(priv_path, priv_pem, PRIVATE_KEY_MODE)
        _write_with_mode(pub_path, pub_pem, PUBLIC_KEY_MODE)
    except OSError as e:
        raise SigningError(
            f"cannot write keys to {str(out)!r} ({e.strerror}); choose a writable --out"
        ) from None
    return priv_path, pub_path


def _write_with_mode(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with exactly ``mode``, set before the first byte (the umask does not apply)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as fh:
        os.fchmod(fh.fileno(), mode)  # O_CREAT's mode is filtered by the umask and ignored on --force
        fh.write(data)


def check_private_key_mode(path: Path) -> None:
    """Refuse a private key file that group or others can read or change (as ssh refuses one)."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise SigningError(
            f"signing key {str(path)!r} is accessible by group or others (mode {mode:04o});"
            f" run 'chmod 600 {path}' and try again"
        )


def load_private_key(path: str | os.PathLike[str]) -> bytes:
    """Read a PEM PKCS8 Ed25519 private key file; return the raw 32-byte private key."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import (
        Encoding,
        NoEncryption,
        PrivateFormat,
        load_pem_private_key,
    )

    p = Path(path)
    try:
        if p.stat().st_size > PRIVATE_KEY_MAX_BYTES:
            raise SigningError(
                f"signing key {str(p)!r} is larger than {PRIVATE_KEY_MAX_BYTES} bytes; is it a key?"
            )
        check_private_key_mode(p)
        data = p.read_bytes()
    except FileNotFoundError:
        raise SigningError(
            f"signing key {str(p)!r} does not exist; create one with 'edgefleet keys create --out DIR'"
        ) from None
    except OSError as e:
        raise SigningError(f"cannot read signing key {str(p)!r} ({e.strerror})") from None
    if b"PRIVATE KEY" not in data:
        raise SigningError(
            f"signing key {str(p)!r} is not a PEM private key; pass the .key file (not the .pub) from 'edgefleet keys create'"
        )
    try:
        key = load_pem_private_key(data, password=None)
    except TypeError:
        raise SigningError(
            f"signing key {str(p)!r} is encrypted; edgefleet reads unencrypted PKCS8 keys"
        ) from None
    except ValueError:
        raise SigningError(f"signing key {str(p)!r} is not a valid PEM private key") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(
            f"signing key {str(p)!r} is a {type(key).__name__}, not Ed25519; use 'edgefleet keys create'"
        )
    return key.private_bytes(Encoding.Raw, PrivateFormat.Raw, NoEncryption())


def load_public_key(path: str | os.PathLike[str]) -> bytes:
    """Read a PEM public key file; return the raw 32-byte Ed25519 public key."""
    try:
        return load_public_key_file(path)
    except KeyFileError as e:
        raise SigningError(str(e)) from None


def sign_bundle(bundle_dir: Path, key_path: Path) -> None:
    """Sign the exact bytes of ``bundle_dir/manifest.json`` with ``key_path``; write ``manifest.sig``."""
    private_raw = load_private_key(key_path)
    raw = read_manifest_bytes(Path(bundle_dir))
    sig = sign_manifest(raw, private_raw)
    tmp = Path(bundle_dir) / (SIGNATURE_FILE + ".tmp")
    try:
        tmp.write_bytes(sig)
        os.replace(tmp, Path(bundle_dir) / SIGNATURE_FILE)
    except OSError as e:
        raise SigningError(f"cannot write {SIGNATURE_FILE} in {str(bundle_dir)!r} ({e.strerror})") from None
