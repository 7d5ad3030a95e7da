"""Whole federations on one machine through Flower's simulation engine."""

from lorafleet.protocols.cli import package_version as _package_version

__version__ = _package_version()
"""The installed lorafleet distribution's version (the same in every subpackage)."""
