"""``lorafleet-server``: the coordinator's operator commands.

``bases publish`` copies a base (a model folder or a .gguf file) into the
content-addressed store and prints its manifest digest, the ``base-sha256`` of the run
config; ``bases serve`` serves the store over gRPC to devices that lack a base (TLS with
``--tls-cert``/``--tls-key``; plain gRPC only on loopback).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from lorafleet.protocols.errors import LorafleetError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorafleet-server", description="Operate a lorafleet coordinator."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    bases = sub.add_parser("bases", help="publish and serve frozen base models").add_subparsers(
        dest="action", required=True
    )
    p = bases.add_parser(
        "publish", help="add a model folder or .gguf file to the store; prints its digest"
    )
    p.add_argument("source", type=Path)
    p.add_argument("--store", type=Path, required=True, help="the coordinator's base store folder")
    p.add_argument(
        "--name", default=None, help="human-readable name (default: the file or folder name)"
    )
    p = bases.add_parser("serve", help="serve the store's bases over gRPC until interrupted")
    p.add_argument("--store", type=Path, required=True)
    p.add_argument("--address", default="127.0.0.1:9100", help="host:port to listen on")
    p.add_argument("--tls-cert", type=Path, default=None, help="server certificate chain (PEM)")
    p.add_argument("--tls-key", type=Path, default=None, help="server private key (PEM)")
    return parser


def _is_loopback(address: str) -> bool:
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _publish(args: argparse.Namespace) -> None:
    from lorafleet.server.base_store import BaseStore

    manifest = BaseStore(args.store).publish(args.source, name=args.name)
    size = sum(f.size for f in manifest.files)
    print(f"published {manifest.name}: {len(manifest.files)} file(s), {size / 2**20:.1f} MiB")
    print(f"base-sha256 = {manifest.digest()}")


def _serve(args: argparse.Namespace) -> None:
    from lorafleet.server.base_service import ServerTLS, serve_bases
    from lorafleet.server.base_store import BaseStore

    if (args.tls_cert is None) != (args.tls_key is None):
        raise LorafleetError("give both --tls-cert and --tls-key, or neither")
    tls = ServerTLS.from_files(args.tls_cert, args.tls_key) if args.tls_cert else None
    if tls is None and not _is_loopback(args.address):
        raise LorafleetError(
            f"refusing plain gRPC on {args.address}: pass --tls-cert and --tls-key, or bind to 127.0.0.1"
        )
    store = BaseStore(args.store)
    server, port = serve_bases(store, args.address, tls=tls)
    host = args.address.rsplit(":", 1)[0]
    print(
        f"serving {len(list(store.digests()))} base(s) on {host}:{port} ({'TLS' if tls else 'plain, loopback'})",
        flush=True,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(grace=2).wait()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit code."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        {"publish": _publish, "serve": _serve}[args.action](args)
    except LorafleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
