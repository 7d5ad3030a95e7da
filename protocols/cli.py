"""What the three commands share: ``--version`` and help that shows every default.

``lorafleet``, ``lorafleet-sim`` and ``lorafleet-server`` live in packages that must not
import one another (client and server) or are above both (sim), so the pieces all three
need sit here, below them; nothing here imports more than the standard library.
"""

from __future__ import annotations

import argparse
from importlib.metadata import PackageNotFoundError, version

__all__ = ["DefaultsHelpFormatter", "add_version_flag", "package_version"]


def package_version() -> str:
    """The installed lorafleet distribution's version (``0+unknown`` from a bare checkout).

    Read from the package metadata, so it never imports torch and always matches what
    pip installed.

    Examples
    --------
    >>> package_version()  # doctest: +SKIP
    '0.1.0'
    """
    try:
        return version("lorafleet")
    except PackageNotFoundError:
        return "0+unknown"


def add_version_flag(parser: argparse.ArgumentParser) -> None:
    """Add ``--version``: print ``PROG VERSION`` and exit 0, as pip and flwr do."""
    parser.add_argument(
        "--version",
        action="version",
        version=f"%(prog)s {package_version()}",
        help="print the version and exit",
    )


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Append ``(default: X)`` to a flag's help, except where there is nothing to show.

    Required flags, switches (default False) and flags whose default is None (for
    "chosen at run time") get no suffix; argparse's own formatter would print
    ``(default: None)`` for them.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if action.required or default is None or default is False or default == argparse.SUPPRESS:
            return text
        if isinstance(action.default, str) and not action.default:
            return text + " (default: empty)" if "%(default)" not in text else text
        return super()._get_help_string(action)
