"""lorafleet: federated on-device personalization of language models.

The code lives in four subpackages, each a top-level folder of the repository mapped to
its import name in pyproject (``package-dir``): :mod:`lorafleet.protocols` (the contract
both sides share), :mod:`lorafleet.client` (the device: SDK, training, ClientApp),
:mod:`lorafleet.server` (the coordinator: ServerApp, registry, backup, console) and
:mod:`lorafleet.sim` (whole federations on one machine). This file exists so that
``lorafleet.__version__`` works without importing any of them (and so no torch).
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lorafleet")
    """The installed lorafleet distribution's version, from its metadata."""
except PackageNotFoundError:  # a bare checkout on sys.path, never installed
    __version__ = "0+unknown"

__all__ = ["__version__"]
