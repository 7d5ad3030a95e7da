"""``lorafleet info --json``: this install and a profile as one JSON document, without torch.

Scripts and monitoring call it often; importing torch would cost seconds each time, so
everything here is read from package metadata and files. The torch device is therefore
not reported (``lorafleet info`` without ``--json`` does that).
"""

from __future__ import annotations

import platform
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from lorafleet.client.layout import cache_root, default_gguf_path
from lorafleet.client.profile import Profile
from lorafleet.protocols.cli import package_version
from lorafleet.protocols.errors import LorafleetError

__all__ = ["info_document"]

_PACKAGES = ("torch", "transformers", "peft", "onnxruntime", "flwr")


def _installed(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def info_document(profile: Path | None = None) -> dict[str, Any]:
    """The install (versions, default base, cache) and, if given, a profile's versions.

    Examples
    --------
    >>> info_document()["lorafleet"]  # doctest: +SKIP
    '0.1.0'
    """
    try:
        default: str | None = str(default_gguf_path())
        problem = None
    except LorafleetError as exc:
        default, problem = None, str(exc)
    doc: dict[str, Any] = {
        "lorafleet": package_version(),
        "python": platform.python_version(),
        "packages": {name: _installed(name) for name in _PACKAGES},
        "default_base": default,
        "default_base_problem": problem,
        "cache_dir": str(cache_root()),
    }
    if profile is None:
        return doc
    opened = Profile.open(Path(profile))
    current = opened.current_version()
    doc["profile"] = {
        "path": str(profile),
        "base_source": Profile.read_base_source(Path(profile)),
        "spec": opened.spec.to_dict(),
        "current_version": current,
        "versions": [
            {
                "version": p.version,
                "parent": p.parent,
                "created_at": p.created_at,
                "prior_version": p.prior_version,
                "round": p.round,
                "metrics": dict(p.metrics),
            }
            for p in opened.versions()
        ],
    }
    return doc
