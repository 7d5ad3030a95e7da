"""A Flower Grid that forwards everything to another Grid.

The coordinator wraps the Grid it is given to watch or adjust what travels (counting
bytes, widening SecAgg+'s masked vectors) without touching Flower's workflow code;
subclasses override :meth:`GridProxy.send_and_receive`, the one call the workflows use.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid
from flwr.supercore.run import Run


class GridProxy(Grid):
    """Every Grid call, forwarded to ``inner``."""

    def __init__(self, inner: Grid) -> None:
        self.inner = inner

    def set_run(self, run: Run) -> None:
        """Forwarded."""
        self.inner.set_run(run)

    @property
    def run(self) -> Run:
        """Forwarded."""
        return self.inner.run

    def create_message(
        self,
        content: RecordDict,
        message_type: str,
        dst_node_id: int,
        group_id: str,
        ttl: float | None = None,
    ) -> Message:
        """Forwarded."""
        return self.inner.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Forwarded."""
        return self.inner.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Forwarded."""
        return self.inner.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Forwarded."""
        return self.inner.pull_messages(message_ids)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        """Forwarded; the method subclasses override."""
        return self.inner.send_and_receive(messages, timeout=timeout)
