"""The contract client and server share: adapter specs, seeds, encodings, manifests."""

from lorafleet.protocols.encoding import Packing as Packing
from lorafleet.protocols.encoding import content_hash as content_hash
from lorafleet.protocols.encoding import decode_tensors as decode_tensors
from lorafleet.protocols.encoding import encode_tensors as encode_tensors
from lorafleet.protocols.errors import DataError as DataError
from lorafleet.protocols.errors import IntegrityError as IntegrityError
from lorafleet.protocols.errors import LorafleetError as LorafleetError
from lorafleet.protocols.errors import SpecError as SpecError
from lorafleet.protocols.manifest import BaseManifest as BaseManifest
from lorafleet.protocols.manifest import ManifestFile as ManifestFile
from lorafleet.protocols.provenance import AdapterProvenance as AdapterProvenance
from lorafleet.protocols.seeds import derive_a as derive_a
from lorafleet.protocols.spec import AdapterSpec as AdapterSpec

__all__ = [
    "AdapterProvenance",
    "AdapterSpec",
    "BaseManifest",
    "DataError",
    "IntegrityError",
    "LorafleetError",
    "ManifestFile",
    "Packing",
    "SpecError",
    "content_hash",
    "decode_tensors",
    "derive_a",
    "encode_tensors",
]
