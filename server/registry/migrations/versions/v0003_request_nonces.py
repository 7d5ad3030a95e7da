"""The backup service's replay cache, in the registry.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04

The nonce of every accepted signed request is kept until its timestamp is too old to
pass the clock check; before, the cache lived in memory and a captured request replayed
after a restart within its window. Only an addition: nothing to migrate.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Create ``request_nonces``."""
    op.create_table(
        "request_nonces",
        sa.Column("public_key", sa.LargeBinary(32), nullable=False),
        sa.Column("nonce", sa.LargeBinary(16), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("public_key", "nonce", name="pk_request_nonces"),
    )
    op.create_index("ix_request_nonces_expires_at", "request_nonces", ["expires_at"])


def downgrade() -> None:
    """Drop ``request_nonces``."""
    op.drop_index("ix_request_nonces_expires_at", table_name="request_nonces")
    op.drop_table("request_nonces")
