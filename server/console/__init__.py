"""The coordinator's admin console: server-rendered pages over the registry, with login and audit."""

from lorafleet.server.console.app import ConsoleConfig as ConsoleConfig
from lorafleet.server.console.app import create_app as create_app
from lorafleet.server.console.auth import AdminStore as AdminStore

__all__ = ["AdminStore", "ConsoleConfig", "create_app"]
