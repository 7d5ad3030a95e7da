"""The blob store: content-addressed, crash-safe, resumable uploads with promised hashes."""

from __future__ import annotations

import hashlib
import stat
from pathlib import Path

import pytest

from lorafleet.protocols.errors import IntegrityError, SpecError
from lorafleet.server.blob_store import (
    BlobNotFoundError,
    BlobStore,
    BlobTooLargeError,
    UploadBusyError,
)

BLOB_ID = "ab" * 16
OWNER = "7"
DATA = bytes(range(256)) * 64  # 16 KiB


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def store(tmp_path: Path) -> BlobStore:
    return BlobStore(tmp_path / "blobs", max_blob_bytes=1 << 20)


def test_an_upload_in_one_go_is_stored_read_only_under_its_sha256(store: BlobStore) -> None:
    # Execute
    with store.upload(OWNER, BLOB_ID, size=len(DATA), sha256=sha(DATA)) as up:
        up.write(DATA[:100])
        up.write(DATA[100:])
        digest = up.commit()

    # Assert
    path = store.object_path(digest)
    assert digest == sha(DATA)
    assert path == store.root / "objects" / digest[:2] / digest
    assert store.read(digest) == DATA
    assert store.read(digest, 10, 5) == DATA[10:15]
    assert b"".join(store.iter_chunks(digest, 1000, 4096)) == DATA[1000:]
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert store.upload_state(OWNER, BLOB_ID) is None
    assert store.verify(digest)


def test_an_interrupted_upload_resumes_from_what_the_store_holds(store: BlobStore) -> None:
    # Prepare: a first call sends 5000 bytes and ends (dropped connection)
    with store.upload(OWNER, BLOB_ID, size=len(DATA), sha256=sha(DATA)) as up:
        up.write(DATA[:5000])
    state = store.upload_state(OWNER, BLOB_ID)
    assert state is not None and state.received == 5000

    # Execute: a second call resumes at 5000 with the rest
    with store.upload(OWNER, BLOB_ID, size=len(DATA), sha256=sha(DATA), offset=5000) as up:
        up.write(DATA[5000:])
        digest = up.commit()

    # Assert
    assert store.read(digest) == DATA


def test_a_resume_before_the_held_bytes_drops_the_rest_and_rewrites_them(
    store: BlobStore,
) -> None:
    # Prepare
    with store.upload(OWNER, BLOB_ID, size=len(DATA), sha256=sha(DATA)) as up:
        up.write(DATA[:8000])

    # Execute
    with store.upload(OWNER, BLOB_ID, size=len(DATA), sha256=sha(DATA), offset=3000) as up:
        up.write(DATA[3000:])
        digest = up.commit()

    # Assert
    assert store.read(digest) == DATA


def test_a_resume_past_the_held_bytes_is_refused_with_the_offset_to_use(
    store: BlobStore,
) -> None:
    # Prepare
    with store.upload(OWNER, BLOB_ID, size=len(DATA), sha256=sha(DATA)) as up:
        up.write(DATA[:100])

    # Execute / Assert
    with pytest.raises(SpecError, match="resume from 100"):
        store.upload(OWNER, BLOB_ID, size=len(DATA), sha256=sha(DATA), offset=500)


def test_bytes_that_do_not_match_the_promised_sha256_are_discarded(store: BlobStore) -> None:
    # Prepare
    bad = bytearray(DATA)
    bad[77] ^= 1

    # Execute
    with store.upload(OWNER, BLOB_ID, size=len(DATA), sha256=sha(DATA)) as up:
        up.write(bytes(bad))
        with pytest.raises(IntegrityError, match="upload it again from offset 0"):
            up.commit()

    # Assert: nothing stored, nothing left to resume from
    assert not store.exists(sha(DATA))
    assert store.upload_state(OWNER, BLOB_ID) is None


def test_a_blob_over_the_limit_is_refused_before_any_byte(store: BlobStore) -> None:
    # Execute / Assert
    with pytest.raises(BlobTooLargeError, match="over this store's limit"):
        store.upload(OWNER, BLOB_ID, size=(1 << 20) + 1, sha256=sha(b""))
    assert store.upload_state(OWNER, BLOB_ID) is None


def test_more_bytes_than_promised_are_refused(store: BlobStore) -> None:
    # Execute / Assert
    with store.upload(OWNER, BLOB_ID, size=10, sha256=sha(DATA[:10])) as up:
        up.write(DATA[:8])
        with pytest.raises(BlobTooLargeError, match="more than the 10"):
            up.write(DATA[8:12])


def test_the_same_upload_cannot_be_written_by_two_calls_at_once(store: BlobStore) -> None:
    # Prepare
    first = store.upload(OWNER, BLOB_ID, size=len(DATA), sha256=sha(DATA))

    # Execute / Assert
    with pytest.raises(UploadBusyError, match="another call"):
        store.upload(OWNER, BLOB_ID, size=len(DATA), sha256=sha(DATA))
    first.close()
    store.upload(OWNER, BLOB_ID, size=len(DATA), sha256=sha(DATA)).close()  # free again


def test_an_upload_promising_another_blob_starts_again(store: BlobStore) -> None:
    # Prepare
    with store.upload(OWNER, BLOB_ID, size=len(DATA), sha256=sha(DATA)) as up:
        up.write(DATA[:100])
    other = b"x" * 50

    # Execute
    with store.upload(OWNER, BLOB_ID, size=len(other), sha256=sha(other)) as up:
        up.write(other)
        digest = up.commit()

    # Assert
    assert store.read(digest) == other


def test_erasing_an_owner_removes_only_their_unfinished_uploads(store: BlobStore) -> None:
    # Prepare
    for owner in ("7", "8"):
        with store.upload(owner, BLOB_ID, size=len(DATA), sha256=sha(DATA)) as up:
            up.write(DATA[:1000])

    # Execute
    count, held = store.erase_owner_uploads("7")

    # Assert
    assert (count, held) == (1, 1000)
    assert store.uploads_of("7") == []
    assert [u.received for u in store.uploads_of("8")] == [1000]


def test_delete_removes_the_object_and_reports_its_size(store: BlobStore) -> None:
    # Prepare
    digest = store.put(DATA)

    # Execute
    first, second = store.delete(digest), store.delete(digest)

    # Assert
    assert (first, second) == (len(DATA), 0)
    with pytest.raises(BlobNotFoundError):
        store.read(digest)


@pytest.mark.parametrize(
    ("owner", "blob_id", "digest", "match"),
    [
        ("../x", BLOB_ID, sha(DATA), "blob owner"),
        (OWNER, "../../etc", sha(DATA), "blob id"),
        (OWNER, BLOB_ID.upper(), sha(DATA), "blob id"),
        (OWNER, BLOB_ID, "0" * 63, "sha256"),
    ],
)
def test_names_that_could_escape_the_store_are_refused(
    store: BlobStore, owner: str, blob_id: str, digest: str, match: str
) -> None:
    # Execute / Assert
    with pytest.raises(SpecError, match=match):
        store.upload(owner, blob_id, size=1, sha256=digest)


def test_a_damaged_object_fails_verification(store: BlobStore) -> None:
    # Prepare
    digest = store.put(DATA)
    path = store.object_path(digest)
    path.chmod(0o644)
    raw = bytearray(path.read_bytes())
    raw[5] ^= 0xFF
    path.write_bytes(bytes(raw))

    # Execute / Assert
    assert not store.verify(digest)
