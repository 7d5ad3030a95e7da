"""Which addresses may go without TLS, and what counts as a root certificate."""

from __future__ import annotations

from pathlib import Path

import pytest

from lorafleet.protocols.errors import LorafleetError
from lorafleet.protocols.transport import is_loopback, read_root_certificate


@pytest.mark.parametrize(
    ("address", "loopback"),
    [
        ("127.0.0.1:50051", True),
        ("127.8.9.1:1", True),
        ("localhost:8600", True),
        ("[::1]:443", True),
        ("10.0.0.5:50051", False),
        ("[2001:db8::1]:443", False),
        ("coordinator.example.org:443", False),
        ("0.0.0.0:50051", False),
    ],
)
def test_only_this_machine_counts_as_loopback(address: str, loopback: bool) -> None:
    # Execute / Assert
    assert is_loopback(address) is loopback


def test_a_pem_certificate_is_read_from_bytes_or_a_file(tmp_path: Path) -> None:
    # Prepare
    pem = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    path = tmp_path / "ca.pem"
    path.write_bytes(pem)

    # Execute / Assert
    assert read_root_certificate(pem) == pem
    assert read_root_certificate(path) == pem


@pytest.mark.parametrize(
    ("content", "error"), [(None, "cannot read"), (b"not a certificate", "not a PEM")]
)
def test_a_missing_or_non_pem_certificate_is_one_clear_error(
    tmp_path: Path, content: bytes | None, error: str
) -> None:
    # Prepare
    path = tmp_path / "ca.pem"
    if content is not None:
        path.write_bytes(content)

    # Execute / Assert
    with pytest.raises(LorafleetError, match=error):
        read_root_certificate(path)
