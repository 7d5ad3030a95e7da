"""What runs on a device: base loading, personal adapters, local training, the SDK."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from lorafleet.protocols.cli import package_version as _package_version

if TYPE_CHECKING:  # type checkers see plain re-exports; runtime imports on first use
    from lorafleet.client.base import LoadedBase as LoadedBase
    from lorafleet.client.base import load_base as load_base
    from lorafleet.client.data import DataConfig as DataConfig
    from lorafleet.client.data import Example as Example
    from lorafleet.client.keys import KeyStore as KeyStore
    from lorafleet.client.keys import UnlockedKeys as UnlockedKeys
    from lorafleet.client.sdk import EvalReport as EvalReport
    from lorafleet.client.sdk import PersonalModel as PersonalModel
    from lorafleet.client.sdk import TrainReport as TrainReport
    from lorafleet.client.train import TrainConfig as TrainConfig
    from lorafleet.client.train import TrainResult as TrainResult

# torch and transformers take seconds to import; `lorafleet --help` should not wait for them.
_LAZY = {
    "LoadedBase": "lorafleet.client.base",
    "load_base": "lorafleet.client.base",
    "DataConfig": "lorafleet.client.data",
    "Example": "lorafleet.client.data",
    "KeyStore": "lorafleet.client.keys",
    "UnlockedKeys": "lorafleet.client.keys",
    "EvalReport": "lorafleet.client.sdk",
    "PersonalModel": "lorafleet.client.sdk",
    "TrainReport": "lorafleet.client.sdk",
    "TrainConfig": "lorafleet.client.train",
    "TrainResult": "lorafleet.client.train",
}

__version__ = _package_version()
"""The installed lorafleet distribution's version (the same in every subpackage)."""
__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lorafleet.client' has no attribute {name!r}")
