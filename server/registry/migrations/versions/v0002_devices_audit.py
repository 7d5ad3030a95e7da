"""Devices and SuperNodes, enrolment tokens, the audit log, operator controls, DP spent per round.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23

The backup service authorizes requests by a device's enrolled Ed25519 key, the console
revokes devices and SuperNodes, pauses training and writes every action to an audit
log, and rounds record the differential privacy spent. Only additions: every existing
row stays valid, so an upgrade of a running registry needs no data step.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def _id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _pk() -> sa.Column[int]:
    return sa.Column("id", _id(), primary_key=True, autoincrement=True)


def _ts(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    """Create the new tables and add the DP columns to ``rounds``."""
    op.add_column("rounds", sa.Column("dp_epsilon", sa.Float(), nullable=True))
    op.add_column("rounds", sa.Column("dp_delta", sa.Float(), nullable=True))

    op.create_table(
        "devices",
        _pk(),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("user_id", _id(), nullable=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("public_key", sa.LargeBinary(32), nullable=True),
        sa.Column("node_id", sa.String(20), nullable=True),
        _ts("enrolled_at"),
        _ts("last_seen_at", nullable=True),
        _ts("revoked_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_devices"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_devices_user_id_users", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("public_key", name="uq_devices_public_key"),
        sa.UniqueConstraint("node_id", name="uq_devices_node_id"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_devices_user_id_id", "devices", ["user_id", "id"])
    op.create_index("ix_devices_kind_id", "devices", ["kind", "id"])

    op.create_table(
        "enrolment_tokens",
        _pk(),
        sa.Column("user_id", _id(), nullable=False),
        sa.Column("token_sha256", sa.String(64), nullable=False),
        _ts("created_at"),
        _ts("expires_at"),
        _ts("used_at", nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_enrolment_tokens"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_enrolment_tokens_user_id_users", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("token_sha256", name="uq_enrolment_tokens_token_sha256"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_enrolment_tokens_user_id", "enrolment_tokens", ["user_id"])

    op.create_table(
        "audit_log",
        _pk(),
        _ts("at"),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(256), nullable=False),
        sa.Column("detail_json", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_log"),
        sqlite_autoincrement=True,
    )

    op.create_table(
        "controls",
        sa.Column("key", sa.String(128), nullable=False),
        sa.Column("value_json", sa.Text(), nullable=False),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("key", name="pk_controls"),
    )


def downgrade() -> None:
    """Drop what :func:`upgrade` added (devices, tokens, audit entries and controls go)."""
    for table in ("controls", "audit_log", "enrolment_tokens", "devices"):
        op.drop_table(table)
    with op.batch_alter_table("rounds") as batch:
        batch.drop_column("dp_delta")
        batch.drop_column("dp_epsilon")
