"""``lorafleet-server``: the coordinator's operator commands.

``bases publish`` copies a base (a model folder or a .gguf file) into the
content-addressed store and prints its manifest digest, the ``base-sha256`` of the run
config; ``bases serve`` serves the store over gRPC to devices that lack a base (TLS with
``--tls-cert``/``--tls-key``; plain gRPC only on loopback).

``users enroll-token`` prints a one-time token that enrols one device of a user for
encrypted backups (``--create`` registers a new pseudonym first); ``users revoke-device``
refuses a device from then on; ``backup serve`` runs the backup service
(``docs/backup.md``) over a blob store folder and the registry, TLS as for bases.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from lorafleet.protocols.cli import DefaultsHelpFormatter, add_version_flag
from lorafleet.protocols.errors import LorafleetError
from lorafleet.protocols.transport import is_loopback


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorafleet-server",
        description="Operate a lorafleet coordinator.",
        formatter_class=DefaultsHelpFormatter,
    )
    add_version_flag(parser)
    loud = parser.add_mutually_exclusive_group()
    loud.add_argument("-v", "--verbose", action="store_true", help="log what happens (INFO)")
    loud.add_argument("-q", "--quiet", action="store_true", help="log errors only")
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
    _console_parser(sub)
    _users_parser(sub)
    _backup_parser(sub)
    return parser


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
    if tls is None and not is_loopback(args.address):
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


def _console_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("console", help="serve the admin web console over the coordinator's state")
    p.set_defaults(action="console")
    p.add_argument("--data-dir", type=Path, required=True, help="the coordinator's data dir")
    p.add_argument("--registry", default="", help="registry URL (default: SQLite in data-dir)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    p.add_argument("--port", type=int, default=8600)
    p.add_argument(
        "--blob-store", type=Path, default=None, help="backup blob store (default: data-dir/blobs)"
    )
    p.add_argument("--tls-cert", type=Path, default=None, help="certificate chain (PEM) for HTTPS")
    p.add_argument("--tls-key", type=Path, default=None, help="private key (PEM) for HTTPS")
    p.add_argument(
        "--forwarded-allow-ips",
        default=None,
        metavar="ADDRS",
        help="comma-separated addresses/networks of a reverse proxy in front of the console "
        "whose X-Forwarded-For/-Proto headers are believed (default: none, the peer address "
        "is the client's)",
    )


def _console(args: argparse.Namespace) -> None:
    from lorafleet.server.blob_store import BlobStore
    from lorafleet.server.console.app import (
        ConsoleConfig,
        ConsoleServer,
        blob_store_eraser,
        create_app,
    )

    if not args.data_dir.is_dir():
        raise LorafleetError(
            f"no coordinator data dir at {args.data_dir}; pass the --data-dir the coordinator uses"
        )
    config = ConsoleConfig(
        data_dir=str(args.data_dir),
        registry_url=args.registry,
        host=args.host,
        port=args.port,
        tls_cert=None if args.tls_cert is None else str(args.tls_cert),
        tls_key=None if args.tls_key is None else str(args.tls_key),
        forwarded_allow_ips=args.forwarded_allow_ips,
    )
    blob_root = args.blob_store or args.data_dir / "blobs"
    eraser = blob_store_eraser(BlobStore(blob_root)) if blob_root.is_dir() else None
    app = create_app(config, on_erase=eraser)
    server = ConsoleServer(app, config)
    url = server.start()
    print(f"console on {url} (registry {app.state.console.registry.url})", flush=True)
    if eraser is None:
        print(f"no blob store at {blob_root}: erasing a user with backups is refused", flush=True)
    if app.state.setup_token is not None:
        print(
            f"no admin yet: open {url}/setup and enter this one-time setup token: "
            f"{app.state.setup_token}",
            flush=True,
        )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop()


def _users_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    users = sub.add_parser("users", help="enrol and revoke users' devices").add_subparsers(
        dest="action", required=True
    )
    p = users.add_parser(
        "enroll-token", help="print a one-time token that enrols one device of USER for backup"
    )
    p.set_defaults(action="enroll-token")
    p.add_argument("user", metavar="USER", help="the user's pseudonym")
    p.add_argument(
        "--registry", required=True, help="registry URL (sqlite:///... or postgresql+psycopg://...)"
    )
    p.add_argument(
        "--ttl", type=int, default=86400, help="seconds the token stays valid (default one day)"
    )
    p.add_argument(
        "--create", action="store_true", help="register USER first if the registry lacks it"
    )
    p = users.add_parser("revoke-device", help="refuse every further request of one device")
    p.set_defaults(action="revoke-device")
    p.add_argument("device_id", metavar="DEVICE_ID", type=int)
    p.add_argument("--registry", required=True, help="registry URL")


def _backup_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    backup = sub.add_parser("backup", help="the encrypted backup service").add_subparsers(
        dest="action", required=True
    )
    p = backup.add_parser("serve", help="serve encrypted backups over gRPC until interrupted")
    p.set_defaults(action="backup-serve")
    p.add_argument("--registry", required=True, help="registry URL")
    p.add_argument("--store", type=Path, required=True, help="the blob store folder")
    p.add_argument("--address", default="127.0.0.1:9200", help="host:port to listen on")
    p.add_argument("--tls-cert", type=Path, default=None, help="server certificate chain (PEM)")
    p.add_argument("--tls-key", type=Path, default=None, help="server private key (PEM)")
    p.add_argument(
        "--max-blob-mb", type=float, default=512.0, help="largest blob accepted, MiB (default 512)"
    )


def _enroll_token(args: argparse.Namespace) -> None:
    from lorafleet.server.registry import NotFoundError, Registry

    with Registry.open(args.registry) as registry:
        if args.create:
            registry.ensure_user(args.user)
        try:
            token = registry.issue_enrolment_token(args.user, ttl_s=args.ttl)
        except NotFoundError:
            raise LorafleetError(
                f"the registry has no user {args.user!r}; check the pseudonym, or pass "
                "--create to register it"
            ) from None
    print(token)  # CLI output: shown once, never stored in clear


def _revoke_device(args: argparse.Namespace) -> None:
    from lorafleet.server.registry import Registry

    with Registry.open(args.registry) as registry:
        device = registry.revoke_device(args.device_id)
    print(f"revoked device {device.id} ({device.name}) at {device.revoked_at}")


def _backup_serve(args: argparse.Namespace) -> None:
    from lorafleet.server.backup_service import BackupServicer, serve_backup
    from lorafleet.server.base_service import ServerTLS
    from lorafleet.server.blob_store import BlobStore
    from lorafleet.server.registry import Registry

    if (args.tls_cert is None) != (args.tls_key is None):
        raise LorafleetError("give both --tls-cert and --tls-key, or neither")
    tls = ServerTLS.from_files(args.tls_cert, args.tls_key) if args.tls_cert else None
    if tls is None and not is_loopback(args.address):
        raise LorafleetError(
            f"refusing plain gRPC on {args.address}: pass --tls-cert and --tls-key, or bind to 127.0.0.1"
        )
    if not 0 < args.max_blob_mb <= 2**20:
        raise LorafleetError(f"--max-blob-mb must be in (0, 1048576], got {args.max_blob_mb}")
    store = BlobStore(args.store, max_blob_bytes=int(args.max_blob_mb * 2**20))
    registry = Registry.open(args.registry)
    try:
        server, port = serve_backup(BackupServicer(registry, store), args.address, tls=tls)
        host = args.address.rsplit(":", 1)[0]
        mode = "TLS" if tls else "plain, loopback"
        print(f"backup service on {host}:{port} ({mode}), blobs in {store.root}", flush=True)
        stop = threading.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda *_: stop.set())
        stop.wait()
        server.stop(grace=2).wait()
    finally:
        registry.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit code."""
    args = _parser().parse_args(argv)
    level = logging.INFO if args.verbose else logging.ERROR if args.quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        {
            "publish": _publish,
            "serve": _serve,
            "console": _console,
            "enroll-token": _enroll_token,
            "revoke-device": _revoke_device,
            "backup-serve": _backup_serve,
        }[args.action](args)
    except LorafleetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
