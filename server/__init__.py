"""The coordinator: Flower ServerApp, adapter registry, blob and base stores."""

from lorafleet.protocols.cli import package_version as _package_version

__version__ = _package_version()
"""The installed lorafleet distribution's version (the same in every subpackage)."""
