"""Alembic environment: migrate the connection the registry hands over, never a config file.

``lorafleet.server.registry.migrate`` puts an open connection (already inside a
transaction, and on PostgreSQL holding an advisory lock) into
``config.attributes["connection"]``; this module runs the migrations on it. For
developers writing a new revision with ``alembic revision --autogenerate``, a
``sqlalchemy.url`` main option works too (see ``migrate.alembic_config``).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, create_engine

from lorafleet.server.registry.models import VERSION_TABLE, metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        compare_type=True,
        render_as_batch=connection.dialect.name == "sqlite",
        # The registry runs SQLite with real BEGIN/COMMIT, so its DDL is transactional.
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations() -> None:
    """Migrate the handed-over connection, or one opened from ``sqlalchemy.url``."""
    config = context.config
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if not url:
        raise RuntimeError(
            "registry migrations need a connection: use Registry.open(url) or "
            "lorafleet.server.registry.migrate.alembic_config(url)"
        )
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            _run(conn)
    finally:
        engine.dispose()


run_migrations()
