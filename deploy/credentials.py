"""Credentials for a Flower deployment of lorafleet: TLS certificates and SuperNode keys.

A SuperLink serves its Fleet, Control and Runtime APIs over one HTTPS port, so it needs
a certificate its SuperNodes, the ``flwr`` CLI and its own SuperExec all trust; and with
``--enable-supernode-auth`` it only lets in SuperNodes whose public key an operator has
registered (``flwr supernode register``), each proving it holds the private key.

This script writes both, for a test or a first deployment on one machine:

``tls OUT``
    A private certificate authority (``ca.crt``, ``ca.key``) and a server certificate
    signed by it (``server.pem``, ``server.key``) for ``127.0.0.1`` and ``localhost``,
    or the ``--host`` names given. Keys are ECDSA P-384 and written readable by the
    owner only.
``node-keys OUT NAME...``
    One ECDSA P-384 key pair per SuperNode in OpenSSH format, the format Flower 1.41
    reads: ``NAME`` (private, for ``flower-supernode --auth-supernode-private-key``)
    and ``NAME.pub`` (for ``flwr supernode register``).

It is deployment tooling, outside the ``lorafleet`` package, so it talks to
``cryptography`` directly; a production SuperLink should use certificates from the
organisation's own CA. Nothing secret is printed.

Examples
--------
``python deploy/credentials.py tls deploy/certs``
``python deploy/credentials.py node-keys deploy/keys supernode-1 supernode-2 supernode-3``
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from lorafleet.protocols.crypto import openssh_ecdsa_keypair, tls_bundle

DEFAULT_HOSTS = ("127.0.0.1", "localhost")
_NODE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class CredentialError(Exception):
    """A bad argument or an existing file in the way; the message says what to do."""


def _write(path: Path, data: bytes, *, secret: bool, force: bool) -> None:
    if path.exists() and not force:
        raise CredentialError(f"{path} exists; pass --force to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _check_hosts(hosts: Sequence[str]) -> None:
    for host in hosts:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not re.fullmatch(r"[A-Za-z0-9.-]{1,253}", host):
                raise CredentialError(
                    f"--host {host!r} is neither an IP address nor a DNS name"
                ) from None


def make_tls(
    out: Path, *, hosts: Sequence[str] = DEFAULT_HOSTS, days: int = 365, force: bool = False
) -> dict[str, Path]:
    """Write a CA and a server certificate for ``hosts`` into ``out``; return the paths.

    Returns
    -------
    dict[str, Path]
        ``ca`` (``ca.crt``), ``ca_key``, ``cert`` (``server.pem``) and ``key``
        (``server.key``).
    """
    if not hosts:
        raise CredentialError("give at least one --host for the server certificate")
    if not 1 <= days <= 3650:
        raise CredentialError(f"--days must be between 1 and 3650, got {days}")
    _check_hosts(hosts)
    bundle = tls_bundle(hosts, days=days)
    paths = {
        "ca": out / "ca.crt",
        "ca_key": out / "ca.key",
        "cert": out / "server.pem",
        "key": out / "server.key",
    }
    _write(paths["ca"], bundle.ca_cert, secret=False, force=force)
    _write(paths["ca_key"], bundle.ca_key, secret=True, force=force)
    _write(paths["cert"], bundle.server_cert, secret=False, force=force)
    _write(paths["key"], bundle.server_key, secret=True, force=force)
    return paths


def make_node_keys(out: Path, names: Sequence[str], *, force: bool = False) -> dict[str, Path]:
    """Write an OpenSSH ECDSA P-384 key pair per SuperNode name; return private-key paths.

    The public key is next to each private key as ``NAME.pub``.
    """
    if not names:
        raise CredentialError("name at least one SuperNode, e.g. supernode-1")
    written: dict[str, Path] = {}
    for name in names:
        if not _NODE_NAME.fullmatch(name):
            raise CredentialError(
                f"SuperNode name {name!r} must be letters, digits, '.', '_' or '-'"
            )
        if name in written:
            raise CredentialError(f"SuperNode name {name!r} is given twice")
        private, public = openssh_ecdsa_keypair()
        _write(out / name, private, secret=True, force=force)
        _write(out / f"{name}.pub", public + f" {name}\n".encode(), secret=False, force=force)
        written[name] = out / name
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    tls = sub.add_parser("tls", help="a CA and a server certificate for the SuperLink")
    tls.add_argument("out", type=Path, help="folder to write ca.crt, server.pem, ...")
    tls.add_argument(
        "--host",
        action="append",
        help="IP address or DNS name the SuperLink is reached at (repeat; default "
        "127.0.0.1 and localhost)",
    )
    tls.add_argument("--days", type=int, default=365, help="validity (default 365)")
    tls.add_argument("--force", action="store_true", help="replace existing files")
    keys = sub.add_parser("node-keys", help="an authentication key pair per SuperNode")
    keys.add_argument("out", type=Path, help="folder to write NAME and NAME.pub")
    keys.add_argument("names", nargs="+", help="SuperNode names, e.g. supernode-1")
    keys.add_argument("--force", action="store_true", help="replace existing files")
    args = parser.parse_args(argv)
    try:
        if args.command == "tls":
            paths = make_tls(
                args.out, hosts=args.host or DEFAULT_HOSTS, days=args.days, force=args.force
            )
            for what, path in paths.items():
                print(f"{what:7} {path}")
        else:
            for name, path in make_node_keys(args.out, args.names, force=args.force).items():
                print(f"{name}: {path} (private), {path}.pub (public)")
    except CredentialError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
