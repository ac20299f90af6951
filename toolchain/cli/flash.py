"""``edgefleet keys | verify | flash | serve``: signing keys, host-side verification and getting bundles onto devices."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from toolchain.cli.options import json_option, public_key_option, ssh_option
from toolchain.cli.passwords import password_file_option, resolve_password
from toolchain.cli.terminal import safe_text


@click.group("keys")
def keys_cmd() -> None:
    """Manage Ed25519 signing keys (private: PEM PKCS8; public: PEM SubjectPublicKeyInfo)."""


@keys_cmd.command("create")
@click.option(
    "--out", "out", required=True, type=click.Path(file_okay=False), help="Folder for NAME.key and NAME.pub."
)
@click.option("--name", default="fleet", show_default=True, help="File name stem of the pair.")
@click.option("--force", is_flag=True, help="Overwrite an existing pair.")
def keys_create_cmd(out: str, name: str, force: bool) -> None:
    """Create a key pair: NAME.key (keep secret, 0600) signs bundles; NAME.pub goes to devices."""
    from device_agent.formats.manifest import key_id
    from toolchain.shipping.signing import create_keys, load_public_key

    priv, pub = create_keys(out, name, force=force)
    click.echo(f"private key: {priv}  (keep it secret; sign with 'edgefleet build --sign-key {priv}')")
    click.echo(f"public key:  {pub}  (copy to devices; list it in [agent] trusted_keys)")
    click.echo(f"key id:      {key_id(load_public_key(pub))}")


def existing_bundle(path: str) -> Path:
    """The bundle folder ``path``; a FlashError when it is not a folder."""
    from toolchain.shipping.flash import FlashError

    p = Path(path)
    if not p.is_dir():
        raise FlashError(f"bundle {path!r} is not a folder; pass the folder that holds manifest.json")
    return p


@click.command("verify")
@click.argument("bundle")
@public_key_option("Public key (.pub) the signature must verify with.")
@click.option("--target", help="Also require this target.")
@json_option("Print the result as JSON.")
def verify_cmd(bundle: str, key: str | None, target: str | None, as_json: bool) -> None:
    """Check a bundle on the host: every file's hash and size, no extra files, and the signature with --key."""
    from device_agent.formats.manifest import SIGNATURE_FILE, VerifyPolicy, manifest_sha256, verify_bundle
    from toolchain.shipping.signing import load_public_key

    b = existing_bundle(bundle)
    keys = (load_public_key(key),) if key else ()
    m = verify_bundle(b, VerifyPolicy(trusted_keys=keys, allow_unsigned=not keys, target=target))
    signed = (b / SIGNATURE_FILE).is_file()
    signature = "verified" if keys else ("present, NOT CHECKED" if signed else "none")
    result: dict[str, Any] = {
        "ok": True,
        "name": m.name,
        "version": m.version,
        "target": m.target,
        "sha256": manifest_sha256(b),
        "files": len(m.files),
        "size_bytes": sum(f.size_bytes for f in m.files),
        "signature": signature,
    }
    result["signature_checked"] = bool(keys)
    if as_json:
        click.echo(json.dumps(result))
    else:
        click.echo(
            f"OK: {m.name} v{m.version} for {m.target}, {len(m.files)} files, {result['size_bytes']} bytes,"
            f" signature {signature}, sha256 {result['sha256'][:16]}"
        )
        if not keys:
            click.echo(
                "WARNING: the signature was NOT CHECKED (no --key): anyone could have made this bundle."
                " Pass --key FLEET.pub to check it.",
                err=True,
            )


@click.command("flash")
@click.argument("bundle")
@click.option(
    "--to",
    "dest",
    required=True,
    help="A local agent state_dir, ssh://user@host[:port]/state_dir, or mqtt://broker[:port]/FLEET[/DEVICE].",
)
@public_key_option("Check the signature with this .pub before sending.")
@click.option(
    "--wait",
    "wait_s",
    type=float,
    default=None,
    help="Wait up to this many seconds for the agent's result (deployed / deploy_failed).",
)
@click.option(
    "--url", help="mqtt:// only: devices fetch the bundle from this HTTP(S) URL instead of MQTT chunks."
)
@ssh_option
@click.option(
    "--chunk-bytes",
    type=click.IntRange(1024, 256 * 1024),
    default=64 * 1024,
    show_default=True,
    help="mqtt:// only: size of each retained chunk.",
)
@password_file_option(
    "mqtt:// only: file holding the MQTT password (or EDGEFLEET_MQTT_PASSWORD); keeps it out of --to."
)
def flash_cmd(
    bundle: str,
    dest: str,
    key: str | None,
    wait_s: float | None,
    url: str | None,
    ssh_options: tuple[str, ...],
    chunk_bytes: int,
    password_file: str | None,
) -> None:
    """Put a bundle onto a device: the agent installs it through its verified, atomic update path."""
    import dataclasses
    import os

    from toolchain.cli.passwords import URL_PASSWORD_WARNING
    from toolchain.shipping import flash as F

    d = F.parse_destination(dest)
    if isinstance(d, F.MqttDest) and d.password is not None:
        click.echo(URL_PASSWORD_WARNING, err=True)  # before anything else can fail
    b = existing_bundle(bundle)
    if isinstance(d, F.MqttDest):
        password = resolve_password(d.password or os.environ.get("EDGEFLEET_MQTT_PASSWORD"), password_file)
        if password is not None and d.username is None:
            raise click.UsageError(
                "an MQTT password needs a user name: --to mqtt://USER@broker/FLEET[/DEVICE]"
            )
        d = dataclasses.replace(d, password=password)
    m = F.check_bundle(b, Path(key) if key else None)
    from device_agent.formats.manifest import manifest_sha256

    sha = manifest_sha256(b)
    result: dict | None = None
    if isinstance(d, F.LocalDest):
        drop = F.flash_local(b, m, d.state_dir)
        click.echo(f"dropped {m.name} v{m.version} into {drop}")
        if wait_s:
            result = F.wait_local(d.state_dir, sha, drop, wait_s)
    elif isinstance(d, F.SshDest):
        drop_s = F.flash_ssh(b, m, d, ssh_options)
        click.echo(f"copied {m.name} v{m.version} to {d.login}:{drop_s}")
        if wait_s:
            result = F.wait_ssh(d, sha, drop_s, wait_s, ssh_options)
    else:
        out = F.flash_mqtt(b, m, d, url=url, wait_s=wait_s, chunk_bytes=chunk_bytes)
        click.echo(
            f"published deployment {out['deployment_id']} on {out['topic']} ({out['source']['kind']} source)"
        )
        if "result" in out:
            event, detail = out["result"]
            result = {
                "state": "committed" if event == "deployed" else "failed",
                "reason": detail.get("reason"),
            }
    if result is not None:
        if result.get("state") == "committed":
            click.echo(f"deployed: the agent now serves {m.name} v{m.version}")
        else:
            raise F.FlashError(f"the agent refused {m.name} v{m.version}: {safe_text(result.get('reason'))}")


@click.command("serve")
@click.argument("bundle_dir")
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; 0.0.0.0 (every interface) lets devices on the network fetch bundles.",
)
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8765, show_default=True, help="Port (0: any free one)."
)
@click.option("--verbose", is_flag=True, help="Log every request.")
def serve_cmd(bundle_dir: str, host: str, port: int, verbose: bool) -> None:
    """Serve a bundle (or a folder of bundles) over HTTP with Range support, for over-the-air downloads."""
    from toolchain.shipping.serve import BundleHTTPServer

    srv = BundleHTTPServer(bundle_dir, host, port, verbose=verbose)
    for prefix in srv.bundles:
        click.echo(f"serving {srv.bundles[prefix]} at {srv.bundle_url(prefix)}", err=False)
    click.echo("press Ctrl+C to stop")
    try:
        srv.serve_forever()
    finally:
        srv.server_close()
