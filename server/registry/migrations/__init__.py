"""Alembic migrations of the registry schema, run programmatically by ``Registry.open``."""
