"""What both ends of lorafleet's gRPC services agree on about the transport.

The coordinator serves bases and backups over gRPC, and devices call them; both sides
decide the same two things: whether an address is this machine (plain text is allowed
only there, for tests and a local TLS-terminating proxy) and whether a file the operator
passed really is a PEM certificate. One definition keeps a device and the server from
disagreeing about which addresses get TLS.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from lorafleet.protocols.errors import LorafleetError

__all__ = ["is_loopback", "read_root_certificate"]


def is_loopback(address: str) -> bool:
    """Whether ``host:port`` (or ``[v6]:port``) names this machine.

    Examples
    --------
    >>> is_loopback("127.0.0.1:50051"), is_loopback("[::1]:1"), is_loopback("example.org:443")
    (True, True, False)
    """
    host = address.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_root_certificate(root_cert: bytes | Path | str) -> bytes:
    """The PEM bytes of a TLS root certificate given as bytes or a file path.

    Raises
    ------
    LorafleetError
        The file cannot be read, or it holds no PEM certificate (one line saying which).
    """
    if isinstance(root_cert, bytes):
        pem = root_cert
    else:
        try:
            pem = Path(root_cert).read_bytes()
        except OSError as exc:
            raise LorafleetError(
                f"cannot read the TLS root certificate {root_cert}: {exc.strerror}; pass a PEM file"
            ) from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise LorafleetError(
            "the TLS root certificate is not a PEM certificate ('-----BEGIN CERTIFICATE-----')"
        )
    return pem
