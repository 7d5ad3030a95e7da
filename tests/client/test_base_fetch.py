"""Fetching a base from a real loopback BaseService: verified, cached once, resumable.

The servers here are real gRPC servers serving a real store. Where a test needs a server
that drops the connection, stalls or lies, it subclasses the servicer: that adversarial
or unlucky server is exactly what the client must cope with.
"""

from __future__ import annotations

import datetime
import ipaddress
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import pytest

from lorafleet.client.base import DEFAULT_BASE_SHA256, default_gguf_path, load_base
from lorafleet.client.base_fetch import fetch_base, fetched_path
from lorafleet.protocols.chunks import ChunkedManifest, FileChunk
from lorafleet.protocols.errors import IntegrityError, LorafleetError
from lorafleet.protocols.manifest import build_manifest
from lorafleet.protocols.v1 import base_pb2
from lorafleet.server.base_service import BaseServicer, ServerTLS, serve_bases
from lorafleet.server.base_store import BaseStore

CHUNK = 16 << 10  # the tiny model (about 126 KiB) becomes 13 chunks


class CountingServicer(BaseServicer):
    """Records every chunk it actually sends."""

    def __init__(self, store: BaseStore) -> None:
        super().__init__(store)
        self.sent: list[tuple[str, int]] = []

    def FetchChunks(
        self, request: base_pb2.FetchChunksRequest, context: grpc.ServicerContext
    ) -> Iterator[base_pb2.Chunk]:
        for msg in super().FetchChunks(request, context):
            self.before_send(context)
            self.sent.append((msg.path, msg.index))
            yield msg

    def before_send(self, context: grpc.ServicerContext) -> None:
        """Hook for subclasses, called before each chunk goes out."""


class DroppingServicer(CountingServicer):
    """Drops the connection once, after ``cut_after`` chunks."""

    def __init__(self, store: BaseStore, cut_after: int) -> None:
        super().__init__(store)
        self.cut_after: int | None = cut_after

    def before_send(self, context: grpc.ServicerContext) -> None:
        if self.cut_after is not None and len(self.sent) == self.cut_after:
            self.cut_after = None
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset by peer (test)")


class StallingServicer(CountingServicer):
    """Stops sending after ``stall_after`` chunks until released."""

    def __init__(self, store: BaseStore, stall_after: int) -> None:
        super().__init__(store)
        self.stall_after = stall_after
        self.release = threading.Event()

    def before_send(self, context: grpc.ServicerContext) -> None:
        if len(self.sent) == self.stall_after:
            self.release.wait(60)


class TamperingServicer(CountingServicer):
    """Flips one bit of one chunk's bytes, keeping the honest hash label."""

    def __init__(self, store: BaseStore, target: tuple[str, int]) -> None:
        super().__init__(store)
        self.target = target

    def read_chunk(self, digest: str, path: str, index: int) -> FileChunk:
        chunk = super().read_chunk(digest, path, index)
        if (path, index) != self.target:
            return chunk
        data = bytes([chunk.data[0] ^ 1]) + chunk.data[1:]
        return FileChunk(chunk.path, chunk.index, chunk.offset, data, chunk.sha256)


@pytest.fixture
def store(tmp_path: Path, tiny_model_dir: Path) -> BaseStore:
    store = BaseStore(tmp_path / "store", chunk_size=CHUNK)
    store.publish(tiny_model_dir, "tiny")
    return store


@pytest.fixture
def manifest(store: BaseStore) -> ChunkedManifest:
    return store.get_manifest(store.digests()[0])


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@contextmanager
def running(servicer: BaseServicer, tls: ServerTLS | None = None) -> Iterator[str]:
    server, port = serve_bases(servicer, tls=tls)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(None)


def test_fetched_base_loads_with_the_round_digest(
    store: BaseStore, manifest: ChunkedManifest, cache: Path, tiny_model_dir: Path
) -> None:
    # Prepare
    servicer = CountingServicer(store)

    # Execute
    with running(servicer) as address:
        path = fetch_base(address, manifest.digest(), cache_dir=cache, progress=True)
    base = load_base(path, expected_sha256=manifest.digest(), cache_dir=cache)

    # Assert
    assert base.sha256 == manifest.digest() == build_manifest(tiny_model_dir, "x").digest()
    assert base.model_id == "tiny"
    assert len(servicer.sent) == manifest.total_chunks == 13
    assert path == cache / "fetched" / manifest.digest() / "tiny"
    assert not (cache / "downloads" / manifest.digest()).exists()


def test_second_fetch_uses_the_cache_without_the_network(
    store: BaseStore, manifest: ChunkedManifest, cache: Path
) -> None:
    # Prepare
    with running(CountingServicer(store)) as address:
        first = fetch_base(address, manifest.digest(), cache_dir=cache, progress=False)

    # Execute: the server is gone now
    second = fetch_base(address, manifest.digest(), cache_dir=cache, progress=False)

    # Assert
    assert second == first
    assert fetched_path(manifest.digest(), cache_dir=cache) == first


def test_a_damaged_cached_base_is_fetched_again(
    store: BaseStore, manifest: ChunkedManifest, cache: Path, tiny_model_dir: Path
) -> None:
    # Prepare
    servicer = CountingServicer(store)
    with running(servicer) as address:
        path = fetch_base(address, manifest.digest(), cache_dir=cache, progress=False)
        (path / "config.json").write_text('{"model_type": "tampered"}', encoding="utf-8")

        # Execute
        again = fetch_base(address, manifest.digest(), cache_dir=cache, progress=False)

    # Assert
    assert (again / "config.json").read_bytes() == (tiny_model_dir / "config.json").read_bytes()
    assert len(servicer.sent) == 2 * manifest.total_chunks


def test_interrupted_download_resumes_fetching_only_the_missing_chunks(
    store: BaseStore, manifest: ChunkedManifest, cache: Path
) -> None:
    # Prepare: the connection drops after 5 chunks (in the middle of model.safetensors)
    servicer = DroppingServicer(store, cut_after=5)
    with running(servicer) as address:
        with pytest.raises(LorafleetError, match=r"interrupted after 5 of 13 chunks.*run again"):
            fetch_base(address, manifest.digest(), cache_dir=cache, progress=False)
        first = list(servicer.sent)
        assert fetched_path(manifest.digest(), cache_dir=cache) is None

        # Execute
        path = fetch_base(address, manifest.digest(), cache_dir=cache, progress=False)

    # Assert
    second = servicer.sent[len(first) :]
    assert len(first) == 5
    assert len(second) == manifest.total_chunks - 5
    assert set(first).isdisjoint(second)
    assert load_base(path, expected_sha256=manifest.digest(), cache_dir=cache).sha256 == (
        manifest.digest()
    )


def test_download_killed_mid_way_resumes_after_restart(
    store: BaseStore, manifest: ChunkedManifest, cache: Path
) -> None:
    # Prepare: a client process that gets 6 chunks, then waits on a stalled server
    servicer = StallingServicer(store, stall_after=6)
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from lorafleet.client.base_fetch import fetch_base
        fetch_base(sys.argv[1], sys.argv[2], cache_dir=Path(sys.argv[3]), progress=False)
        """
    )
    log = cache / "downloads" / manifest.digest() / "chunks.jsonl"
    with running(servicer) as address:
        proc = subprocess.Popen(
            [sys.executable, "-c", script, address, manifest.digest(), str(cache)],
            stderr=subprocess.PIPE,
        )
        try:
            deadline = time.monotonic() + 60
            while not (log.is_file() and len(log.read_text().splitlines()) == 6):
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "the client never recorded 6 chunks"
                time.sleep(0.05)

            # Execute: kill -9, then run again (the dead client's call stays stalled)
            proc.kill()
            proc.wait(30)
            before = len(servicer.sent)
            servicer.stall_after = -1
            path = fetch_base(address, manifest.digest(), cache_dir=cache, progress=False)
            resumed = len(servicer.sent) - before
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
            servicer.release.set()
            if proc.stderr:
                proc.stderr.close()

    # Assert
    assert before == 6
    assert resumed == manifest.total_chunks - 6
    assert build_manifest(path, "x").digest() == manifest.digest()


def test_tampered_chunk_is_refused_and_never_cached(
    store: BaseStore, manifest: ChunkedManifest, cache: Path
) -> None:
    # Prepare
    servicer = TamperingServicer(store, target=("model.safetensors", 2))
    partial = cache / "downloads" / manifest.digest() / "tree" / "tiny" / "model.safetensors"

    # Execute
    with running(servicer) as address, pytest.raises(IntegrityError) as exc:
        fetch_base(address, manifest.digest(), cache_dir=cache, progress=False)

    # Assert
    message = str(exc.value)
    assert "chunk 2 of 'model.safetensors' has sha256" in message
    assert address in message and "refused and not written" in message
    assert fetched_path(manifest.digest(), cache_dir=cache) is None
    assert not (cache / "fetched" / manifest.digest()).exists()
    assert partial.read_bytes()[2 * CHUNK : 3 * CHUNK] == b"\x00" * CHUNK  # bad bytes not written


def test_after_a_tampered_chunk_an_honest_server_completes_the_download(
    store: BaseStore, manifest: ChunkedManifest, cache: Path
) -> None:
    # Prepare
    with (
        running(TamperingServicer(store, target=("model.safetensors", 2))) as bad,
        pytest.raises(IntegrityError),
    ):
        fetch_base(bad, manifest.digest(), cache_dir=cache, progress=False)
    honest = CountingServicer(store)

    # Execute
    with running(honest) as address:
        path = fetch_base(address, manifest.digest(), cache_dir=cache, progress=False)

    # Assert: the 3 files before model.safetensors and its first 2 chunks were kept
    assert len(honest.sent) == manifest.total_chunks - 5
    assert build_manifest(path, "x").digest() == manifest.digest()


class LyingServicer(CountingServicer):
    """Serves altered bytes together with chunk hashes that match them.

    The manifest's full-file sha256s (which the digest covers) stay honest, so only the
    final full-file check can catch it.
    """

    def __init__(self, store: BaseStore) -> None:
        super().__init__(store)
        self.forged: bytes | None = None

    def read_chunk(self, digest: str, path: str, index: int) -> FileChunk:
        chunk = super().read_chunk(digest, path, index)
        if (path, index) != ("config.json", 0):
            return chunk
        import hashlib

        data = chunk.data.replace(b"llama", b"LLAMA")
        return FileChunk(path, index, 0, data, hashlib.sha256(data).hexdigest())

    def GetManifest(
        self, request: base_pb2.GetManifestRequest, context: grpc.ServicerContext
    ) -> base_pb2.Manifest:
        msg = super().GetManifest(request, context)
        forged = self.read_chunk(request.digest, "config.json", 0)
        for f in msg.files:
            if f.path == "config.json":
                f.chunk_sha256[0] = forged.sha256
        return msg


def test_server_lying_about_chunk_hashes_is_caught_by_the_full_file_hash(
    store: BaseStore, manifest: ChunkedManifest, cache: Path
) -> None:
    # Execute
    with running(LyingServicer(store)) as address:
        with pytest.raises(IntegrityError, match=r"file 'config\.json' .* chunk hashes are wrong"):
            fetch_base(address, manifest.digest(), cache_dir=cache, progress=False)

        # Assert: nothing usable was cached, and the bad file's chunks will be fetched again
        assert fetched_path(manifest.digest(), cache_dir=cache) is None
        log = (cache / "downloads" / manifest.digest() / "chunks.jsonl").read_text()
        assert '"path": "config.json"' not in log


def test_a_server_answering_with_another_base_is_refused(
    store: BaseStore, manifest: ChunkedManifest, cache: Path, tmp_path: Path
) -> None:
    # Prepare: a server whose store holds a different base under the asked-for name
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text("{}", encoding="utf-8")
    other_digest = store.publish(other).digest()
    manifests = store.root / "manifests"
    (manifests / f"{manifest.digest()}.json").write_bytes(
        (manifests / f"{other_digest}.json").read_bytes()
    )
    stale = BaseStore(store.root)

    class Impostor(BaseServicer):
        def GetManifest(
            self, request: base_pb2.GetManifestRequest, context: grpc.ServicerContext
        ) -> base_pb2.Manifest:
            return super().GetManifest(base_pb2.GetManifestRequest(digest=other_digest), context)

    # Execute / Assert
    with (
        running(Impostor(stale)) as address,
        pytest.raises(IntegrityError, match="not serving the round's base"),
    ):
        fetch_base(address, manifest.digest(), cache_dir=cache, progress=False)


def test_unknown_base_names_server_and_digest(store: BaseStore, cache: Path) -> None:
    # Execute / Assert
    with (
        running(CountingServicer(store)) as address,
        pytest.raises(
            LorafleetError, match=f"{address} has no base with manifest sha256 {'c' * 64}"
        ),
    ):
        fetch_base(address, "c" * 64, cache_dir=cache, progress=False)


def test_server_down_is_one_clear_error_naming_the_address(
    store: BaseStore, manifest: ChunkedManifest, cache: Path
) -> None:
    # Prepare: a port that was just freed
    with running(CountingServicer(store)) as address:
        pass

    # Execute / Assert
    start = time.monotonic()
    with pytest.raises(LorafleetError, match=f"cannot reach the base server at {address}"):
        fetch_base(address, manifest.digest(), cache_dir=cache, progress=False, timeout=10)
    assert time.monotonic() - start < 10


@pytest.mark.parametrize("digest", ["", "abc", "C" * 64])
def test_malformed_digest_is_refused_before_connecting(cache: Path, digest: str) -> None:
    # Execute / Assert
    with pytest.raises(LorafleetError, match="64 lowercase hex"):
        fetch_base("127.0.0.1:1", digest, cache_dir=cache, progress=False)


def _self_signed() -> tuple[bytes, bytes]:
    """A self-signed certificate for localhost and 127.0.0.1, and its key (PEM)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def test_fetch_over_tls_with_a_self_signed_certificate(
    store: BaseStore, manifest: ChunkedManifest, cache: Path, tmp_path: Path
) -> None:
    # Prepare
    cert, key = _self_signed()
    root_file = tmp_path / "root.pem"
    root_file.write_bytes(cert)

    # Execute
    with running(CountingServicer(store), tls=ServerTLS(cert, key)) as address:
        path = fetch_base(
            address, manifest.digest(), cache_dir=cache, tls_root_cert=root_file, progress=False
        )

    # Assert
    assert build_manifest(path, "x").digest() == manifest.digest()


def test_tls_server_with_an_untrusted_certificate_is_refused(
    store: BaseStore, manifest: ChunkedManifest, cache: Path
) -> None:
    # Prepare: the client trusts another certificate than the one the server presents
    cert, key = _self_signed()
    other_cert, _ = _self_signed()

    # Execute / Assert
    with (
        running(CountingServicer(store), tls=ServerTLS(cert, key)) as address,
        pytest.raises(LorafleetError, match=f"cannot reach the base server at {address}"),
    ):
        fetch_base(
            address,
            manifest.digest(),
            cache_dir=cache,
            tls_root_cert=other_cert,
            progress=False,
            timeout=10,
        )
    assert fetched_path(manifest.digest(), cache_dir=cache) is None


def test_single_gguf_base_is_returned_as_the_file_load_base_takes(
    tmp_path: Path, cache: Path
) -> None:
    # Prepare
    gguf = tmp_path / "src" / "tiny.Q4_1.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(range(256)) * 200)
    store = BaseStore(tmp_path / "store", chunk_size=CHUNK)
    digest = store.publish(gguf).digest()

    # Execute
    with running(BaseServicer(store)) as address:
        path = fetch_base(address, digest, cache_dir=cache, progress=False)

    # Assert: the same digest load_base computes for a .gguf file
    assert path.name == "tiny.Q4_1.gguf" and path.is_file()
    assert build_manifest(path.parent, path.stem, [path.name]).digest() == digest


@pytest.fixture(scope="module")
def default_base_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A server holding the default base (98 MB GGUF, default 4 MiB chunks)."""
    store = BaseStore(tmp_path_factory.mktemp("default-store"))
    assert store.publish(default_gguf_path()).digest() == DEFAULT_BASE_SHA256
    with running(BaseServicer(store)) as address:
        yield address


def test_default_base_fetched_in_full_size_chunks_keeps_its_pinned_digest(
    default_base_server: str, cache: Path
) -> None:
    # Execute
    path = fetch_base(default_base_server, DEFAULT_BASE_SHA256, cache_dir=cache, progress=False)

    # Assert: what load_base hashes for a .gguf path is the pinned digest
    assert path.name == default_gguf_path().name
    assert build_manifest(path.parent, path.stem, [path.name]).digest() == DEFAULT_BASE_SHA256


@pytest.mark.slow
def test_default_base_fetched_loads_with_its_pinned_digest(
    default_base_server: str, cache: Path
) -> None:
    # Prepare
    path = fetch_base(default_base_server, DEFAULT_BASE_SHA256, cache_dir=cache, progress=False)

    # Execute
    base = load_base(path, expected_sha256=DEFAULT_BASE_SHA256, cache_dir=cache)

    # Assert
    assert base.sha256 == DEFAULT_BASE_SHA256
    assert base.model_id == "SmolLM2-135M-Instruct.Q4_1"
