"""The contract client and server share: adapter specs, seeds, encodings, manifests."""

from lorafleet.protocols.cli import package_version as _package_version
from lorafleet.protocols.encoding import Packing as Packing
from lorafleet.protocols.encoding import content_hash as content_hash
from lorafleet.protocols.encoding import decode_tensors as decode_tensors
from lorafleet.protocols.encoding import encode_tensors as encode_tensors
from lorafleet.protocols.envelope import BlobContext as BlobContext
from lorafleet.protocols.envelope import new_blob_id as new_blob_id
from lorafleet.protocols.envelope import open_blob as open_blob
from lorafleet.protocols.envelope import parse_header as parse_header
from lorafleet.protocols.envelope import seal_blob as seal_blob
from lorafleet.protocols.errors import DataError as DataError
from lorafleet.protocols.errors import DecryptionError as DecryptionError
from lorafleet.protocols.errors import IntegrityError as IntegrityError
from lorafleet.protocols.errors import KeyFileRollbackError as KeyFileRollbackError
from lorafleet.protocols.errors import KeyFileTamperedError as KeyFileTamperedError
from lorafleet.protocols.errors import KeyStoreError as KeyStoreError
from lorafleet.protocols.errors import LorafleetError as LorafleetError
from lorafleet.protocols.errors import MissingKeyFileError as MissingKeyFileError
from lorafleet.protocols.errors import SpecError as SpecError
from lorafleet.protocols.errors import StorageError as StorageError
from lorafleet.protocols.errors import WrongPassphraseError as WrongPassphraseError
from lorafleet.protocols.manifest import BaseManifest as BaseManifest
from lorafleet.protocols.manifest import ManifestFile as ManifestFile
from lorafleet.protocols.provenance import AdapterProvenance as AdapterProvenance
from lorafleet.protocols.seeds import derive_a as derive_a
from lorafleet.protocols.spec import AdapterSpec as AdapterSpec

__version__ = _package_version()
"""The installed lorafleet distribution's version, from its metadata (no heavy imports).

The same string as ``lorafleet.__version__``; every subpackage carries it, so code that
imports only one of them can still say which lorafleet it runs.
"""

__all__ = [
    "AdapterProvenance",
    "AdapterSpec",
    "BaseManifest",
    "BlobContext",
    "DataError",
    "DecryptionError",
    "IntegrityError",
    "KeyFileRollbackError",
    "KeyFileTamperedError",
    "KeyStoreError",
    "LorafleetError",
    "ManifestFile",
    "MissingKeyFileError",
    "Packing",
    "SpecError",
    "StorageError",
    "WrongPassphraseError",
    "content_hash",
    "decode_tensors",
    "derive_a",
    "encode_tensors",
    "new_blob_id",
    "open_blob",
    "parse_header",
    "seal_blob",
]
