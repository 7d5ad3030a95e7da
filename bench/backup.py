"""Encrypted backup throughput: seal+upload and download+open against an fsync'd disk write.

For adapters of 0.5, 5 and 50 MB (random bytes standing in for the safetensors file),
each measured side by side with the baseline, interleaved in rotating order:

- ``disk-write`` (baseline): write the same plaintext bytes to a new file on the same
  disk as the blob store, ``fsync`` it, close it. The cheapest way to keep a copy.
- ``seal+upload``: :func:`lorafleet.protocols.envelope.seal_blob` (HKDF + AES-256-GCM),
  then :meth:`BackupClient.put_blob` to a real ``lorafleet-server backup serve`` process
  on loopback (signed request, 1 MiB messages, the server hashes, fsyncs and renames the
  blob into its content-addressed store and records it in a SQLite registry).
- ``download+open``: :meth:`BackupClient.get_blob` (signed, streamed, sha256-checked)
  then :func:`~lorafleet.protocols.envelope.open_blob`.

Reported: median (min/max) milliseconds, MB/s (10^6 bytes), and the ratio of each
path's time to the baseline's (``x_disk``: how many disk writes one backup costs); the
seal and open steps alone are shown too. The server runs in its own process, so client
and server do not share one interpreter lock; both run on this machine's cores.

Usage (from the repository root)::

    python bench/backup.py                  # 0.5, 5 and 50 MB, 7 repeats
    python bench/backup.py --quick          # 0.5 and 2 MB, 3 repeats (seconds)
    python bench/backup.py --json out.json  # also write the result file

Peak memory is this process's max RSS (the client); the server process is not counted.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import _common

from lorafleet.client.backup import BackupClient
from lorafleet.protocols import crypto
from lorafleet.protocols.envelope import BlobContext, new_blob_id, open_blob, seal_blob
from lorafleet.protocols.errors import LorafleetError
from lorafleet.protocols.spec import AdapterSpec
from lorafleet.server.registry import Registry

log = logging.getLogger("bench.backup")

BENCH = "backup"
USER = "bench-user"
ADAPTER = "bench"
SPEC = AdapterSpec(base_model_id="bench", base_sha256="ab" * 32, rank=8)
FULL_SIZES_MB = (0.5, 5.0, 50.0)
QUICK_SIZES_MB = (0.5, 2.0)
PATHS = ("disk-write", "seal+upload", "download+open")


class Server:
    """``lorafleet-server backup serve`` in a child process on a free loopback port."""

    def __init__(self, registry_url: str, store: Path) -> None:
        exe = Path(sys.executable).with_name("lorafleet-server")
        argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "lorafleet.server.cli"]
        self.proc = subprocess.Popen(
            [
                *argv,
                "backup",
                "serve",
                "--registry",
                registry_url,
                "--store",
                str(store),
                "--address",
                "127.0.0.1:0",
                "--max-blob-mb",
                "1024",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"on 127\.0\.0\.1:(\d+)", line)
        if match is None:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            self.stop()
            raise LorafleetError(f"the backup server did not start: {line.strip()} {err[-500:]}")
        self.address = f"127.0.0.1:{match.group(1)}"

    def stop(self) -> None:
        """End the server process (ours, by its handle) and wait for it."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def disk_write(folder: Path, data: bytes, n: int) -> None:
    """The baseline: the bytes to a new file, fsync'd, closed."""
    path = folder / f"plain-{n}.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    path.unlink()


def run(args: argparse.Namespace) -> int:
    sizes = tuple(args.sizes) if args.sizes else (QUICK_SIZES_MB if args.quick else FULL_SIZES_MB)
    repeats = args.repeats or (3 if args.quick else 7)
    warmup = 1
    if args.dir is not None and not Path(args.dir).is_dir():
        raise LorafleetError(f"--dir {args.dir} is not a folder; pass an existing folder")
    with tempfile.TemporaryDirectory(prefix="lorafleet-bench-backup-", dir=args.dir) as tmp:
        root = Path(tmp)
        url = f"sqlite:///{root / 'registry.db'}"
        with Registry.open(url) as registry:
            registry.ensure_user(USER)
            token = registry.issue_enrolment_token(USER)
        server = Server(url, root / "blobs")
        try:
            client = BackupClient.enroll(server.address, token, root / "device.json", name="bench")
            with client:
                result = measure(client, root, sizes, repeats, warmup)
        finally:
            server.stop()
    report(result, sizes, repeats, args)
    return 0


def seal_upload(
    client: BackupClient, key: bytes, context: BlobContext, plaintext: bytes
) -> tuple[float, float]:
    """Seal and upload one adapter; returns (total seconds, seal seconds)."""
    t0 = time.perf_counter()
    sealed = seal_blob(key, context, plaintext, key_id=1)
    t1 = time.perf_counter()
    client.put_blob(
        context.blob_id,
        sealed,
        kind="adapter",
        adapter=context.adapter_id,
        version=context.version,
        spec=SPEC,
        resume=False,  # a fresh blob id, as PersonalModel.backup sends
    )
    return time.perf_counter() - t0, t1 - t0


def download_open(
    client: BackupClient, key: bytes, context: BlobContext, plaintext: bytes
) -> tuple[float, float]:
    """Download and open one adapter; returns (total seconds, open seconds)."""
    t0 = time.perf_counter()
    sealed = client.get_blob(context.blob_id)
    t1 = time.perf_counter()
    opened = open_blob(key, context, sealed)
    t2 = time.perf_counter()
    if opened != plaintext:
        raise LorafleetError("download+open returned other bytes than were sealed")
    return t2 - t0, t2 - t1


def measure(
    client: BackupClient, root: Path, sizes: Sequence[float], repeats: int, warmup: int
) -> dict[float, dict[str, list[float]]]:
    """Seconds per path and size (and the seal/open steps alone), interleaved."""
    key = crypto.random_key()
    version = 0
    samples: dict[float, dict[str, list[float]]] = {
        s: {p: [] for p in (*PATHS, "seal", "open")} for s in sizes
    }
    for i in range(warmup + repeats):
        for size in sizes:
            plaintext = os.urandom(int(size * 1_000_000))
            version += 1
            context = BlobContext(USER, ADAPTER, version, SPEC.base_sha256, new_blob_id())
            got: dict[str, float] = {}
            # Rotate the baseline's place; the download needs the upload before it.
            baseline_first = i % 2 == 0
            if baseline_first:
                t0 = time.perf_counter()
                disk_write(root, plaintext, i)
                got["disk-write"] = time.perf_counter() - t0
            got["seal+upload"], got["seal"] = seal_upload(client, key, context, plaintext)
            got["download+open"], got["open"] = download_open(client, key, context, plaintext)
            if not baseline_first:
                t0 = time.perf_counter()
                disk_write(root, plaintext, i)
                got["disk-write"] = time.perf_counter() - t0
            if i >= warmup:
                for name, seconds in got.items():
                    samples[size][name].append(seconds)
            step = "warm-up" if i < warmup else f"repeat {i + 1 - warmup}/{repeats}"
            log.info("%s, %g MB done", step, size)
    return samples


def report(
    samples: dict[float, dict[str, list[float]]],
    sizes: Sequence[float],
    repeats: int,
    args: argparse.Namespace,
) -> None:
    rows: list[dict[str, Any]] = []
    table: list[list[str]] = []
    ratios: dict[str, dict[str, float]] = {"seal+upload_x_disk": {}, "download+open_x_disk": {}}
    for size in sizes:
        label = f"{size:g} MB"
        stats = {p: _common.Stats.of(v) for p, v in samples[size].items()}
        base = stats["disk-write"].median
        row: dict[str, Any] = {"name": label, "size_mb": size, "repeats": repeats}
        for path, st in stats.items():
            key = path.replace("+", "_").replace("-", "_")
            row[f"{key}_ms"] = st.median * 1e3
            row[f"{key}_ms_min"] = st.min * 1e3
            row[f"{key}_ms_max"] = st.max * 1e3
            row[f"{key}_mb_per_s"] = _common.ratio(size, st.median)
        for path in ("seal+upload", "download+open"):
            x = _common.ratio(stats[path].median, base)
            row[f"{path.replace('+', '_')}_x_disk"] = x
            ratios[f"{path}_x_disk"][label] = x
        rows.append(row)
        for path in (*PATHS, "seal", "open"):
            st = stats[path]
            x = "1.00" if path == "disk-write" else f"{_common.ratio(st.median, base):.2f}"
            table.append(
                [
                    f"{label} {path}",
                    f"{st.median * 1e3:.1f}",
                    f"{st.min * 1e3:.1f}..{st.max * 1e3:.1f}",
                    f"{_common.ratio(size, st.median):.0f}",
                    x,
                ]
            )
    print(
        _common.format_table(["size / path", "median ms", "min..max ms", "MB/s", "x disk"], table)
    )
    print(f"\npeak RSS {_common.max_rss_mb():.0f} MiB (this process: the client)")
    if args.json:
        machine = _common.machine_info()
        machine["load_average"] = _common.load_average()
        _common.write_json(args.json, bench=BENCH, machine=machine, rows=rows, ratios=ratios)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="0.5 and 2 MB, 3 repeats")
    parser.add_argument("--sizes", type=float, nargs="+", help="adapter sizes in MB")
    parser.add_argument("--repeats", type=int, help="timed repeats per size (after 1 warm-up)")
    parser.add_argument("--dir", type=Path, help="folder for the store and the baseline's file")
    parser.add_argument("--json", help="also write the result file here")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    return _common.run_main(run, parse_args(argv), log)


if __name__ == "__main__":
    sys.exit(main())
