"""Initial registry schema: users, specs, adapters, immutable versions, priors, rounds, blobs.

Revision ID: 0001
Revises:
Create Date: 2026-05-20

Written out in full rather than built from ``models.metadata``: a migration is a frozen
record of one schema, while the models move on. A test checks that upgrading an empty
database to head yields exactly the models' schema on SQLite and PostgreSQL.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

_IMMUTABLE = ("adapter_versions", "prior_versions")


def _id() -> sa.types.TypeEngine[int]:
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _pk() -> sa.Column[int]:
    return sa.Column("id", _id(), primary_key=True, autoincrement=True)


def _ts(name: str, *, nullable: bool = False) -> sa.Column[object]:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    """Create every table, index and the immutability triggers."""
    op.create_table(
        "specs",
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("spec_json", sa.Text(), nullable=False),
        sa.Column("base_model_id", sa.String(256), nullable=False),
        sa.Column("base_sha256", sa.String(64), nullable=False),
        sa.Column("cohort_seed", sa.BigInteger(), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("fingerprint", name="pk_specs"),
    )
    op.create_index("ix_specs_base_sha256", "specs", ["base_sha256"])

    op.create_table(
        "users",
        _pk(),
        sa.Column(
            "pseudonym",
            sa.String(128).with_variant(sa.String(128, collation="C"), "postgresql"),
            nullable=False,
        ),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_users"),
        sa.UniqueConstraint("pseudonym", name="uq_users_pseudonym"),
        sqlite_autoincrement=True,
    )

    op.create_table(
        "adapters",
        _pk(),
        sa.Column("user_id", _id(), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("spec_fingerprint", sa.String(64), nullable=False),
        sa.Column("pinned_version", sa.Integer(), nullable=True),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_adapters"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_adapters_user_id_users", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["spec_fingerprint"],
            ["specs.fingerprint"],
            name="fk_adapters_spec_fingerprint_specs",
        ),
        sa.UniqueConstraint("user_id", "name", name="uq_adapters_user_id_name"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_adapters_spec_fingerprint", "adapters", ["spec_fingerprint"])

    op.create_table(
        "adapter_versions",
        _pk(),
        sa.Column("adapter_id", _id(), nullable=False),
        sa.Column("user_id", _id(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("parent", sa.Integer(), nullable=True),
        sa.Column("prior_version", sa.String(128), nullable=True),
        sa.Column("round", sa.Integer(), nullable=True),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("num_params", sa.BigInteger(), nullable=True),
        sa.Column("metrics_json", sa.Text(), nullable=False),
        sa.Column("created_at", sa.String(64), nullable=False),
        _ts("registered_at"),
        sa.PrimaryKeyConstraint("id", name="pk_adapter_versions"),
        sa.ForeignKeyConstraint(
            ["adapter_id"],
            ["adapters.id"],
            name="fk_adapter_versions_adapter_id_adapters",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_adapter_versions_user_id_users", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("adapter_id", "version", name="uq_adapter_versions_adapter_id_version"),
        sa.ForeignKeyConstraint(
            ["adapter_id", "parent"],
            ["adapter_versions.adapter_id", "adapter_versions.version"],
            name="fk_adapter_versions_parent",
        ),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_adapter_versions_content_hash", "adapter_versions", ["content_hash"])
    op.create_index("ix_adapter_versions_user_id_id", "adapter_versions", ["user_id", "id"])

    op.create_table(
        "evaluations",
        _pk(),
        sa.Column("version_id", _id(), nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("round", sa.Integer(), nullable=True),
        sa.Column("metrics_json", sa.Text(), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_evaluations"),
        sa.ForeignKeyConstraint(
            ["version_id"],
            ["adapter_versions.id"],
            name="fk_evaluations_version_id_adapter_versions",
            ondelete="CASCADE",
        ),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_evaluations_version_id_id", "evaluations", ["version_id", "id"])

    op.create_table(
        "prior_versions",
        _pk(),
        sa.Column("ref", sa.String(128), nullable=False),
        sa.Column("spec_fingerprint", sa.String(64), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("round", sa.Integer(), nullable=True),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("metrics_json", sa.Text(), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_prior_versions"),
        sa.ForeignKeyConstraint(
            ["spec_fingerprint"],
            ["specs.fingerprint"],
            name="fk_prior_versions_spec_fingerprint_specs",
        ),
        sa.UniqueConstraint("ref", name="uq_prior_versions_ref"),
        sa.UniqueConstraint(
            "spec_fingerprint", "version", name="uq_prior_versions_spec_fingerprint_version"
        ),
        sqlite_autoincrement=True,
    )

    op.create_table(
        "active_priors",
        sa.Column("spec_fingerprint", sa.String(64), nullable=False),
        sa.Column("prior_id", _id(), nullable=False),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("spec_fingerprint", name="pk_active_priors"),
        sa.ForeignKeyConstraint(
            ["spec_fingerprint"],
            ["specs.fingerprint"],
            name="fk_active_priors_spec_fingerprint_specs",
        ),
        sa.ForeignKeyConstraint(
            ["prior_id"], ["prior_versions.id"], name="fk_active_priors_prior_id_prior_versions"
        ),
    )

    op.create_table(
        "rounds",
        _pk(),
        sa.Column("spec_fingerprint", sa.String(64), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("config_json", sa.Text(), nullable=False),
        _ts("started_at"),
        _ts("finished_at", nullable=True),
        sa.Column("participants", sa.Integer(), nullable=True),
        sa.Column("dropouts", sa.Integer(), nullable=True),
        sa.Column("refused", sa.Integer(), nullable=True),
        sa.Column("bytes_up", sa.BigInteger(), nullable=True),
        sa.Column("bytes_down", sa.BigInteger(), nullable=True),
        sa.Column("prior_ref", sa.String(128), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_rounds"),
        sa.ForeignKeyConstraint(
            ["spec_fingerprint"], ["specs.fingerprint"], name="fk_rounds_spec_fingerprint_specs"
        ),
        sa.UniqueConstraint("spec_fingerprint", "number", name="uq_rounds_spec_fingerprint_number"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_rounds_spec_fingerprint_id", "rounds", ["spec_fingerprint", "id"])

    op.create_table(
        "blobs",
        _pk(),
        sa.Column("blob_id", sa.String(128), nullable=False),
        sa.Column("user_id", _id(), nullable=False),
        sa.Column("adapter_id", _id(), nullable=True),
        sa.Column("version", sa.Integer(), nullable=True),
        sa.Column("kind", sa.String(32), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        _ts("created_at"),
        sa.PrimaryKeyConstraint("id", name="pk_blobs"),
        sa.ForeignKeyConstraint(
            ["user_id"], ["users.id"], name="fk_blobs_user_id_users", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["adapter_id"], ["adapters.id"], name="fk_blobs_adapter_id_adapters", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("blob_id", name="uq_blobs_blob_id"),
        sqlite_autoincrement=True,
    )
    op.create_index("ix_blobs_sha256", "blobs", ["sha256"])
    op.create_index("ix_blobs_user_id_id", "blobs", ["user_id", "id"])
    op.create_index("ix_blobs_adapter_id_version", "blobs", ["adapter_id", "version"])

    _create_immutability_triggers()


def _create_immutability_triggers() -> None:
    # Versions are immutable: the database itself refuses an UPDATE, whoever sends it.
    dialect = op.get_bind().dialect.name
    if dialect == "postgresql":
        op.execute(
            """
            CREATE FUNCTION lorafleet_refuse_update() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION 'lorafleet registry: rows of % are immutable', TG_TABLE_NAME
                    USING ERRCODE = 'integrity_constraint_violation';
            END
            $$
            """
        )
        for table in _IMMUTABLE:
            op.execute(
                f"CREATE TRIGGER {table}_immutable BEFORE UPDATE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION lorafleet_refuse_update()"
            )
    elif dialect == "sqlite":
        for table in _IMMUTABLE:
            op.execute(
                f"CREATE TRIGGER {table}_immutable BEFORE UPDATE ON {table} "
                f"BEGIN SELECT RAISE(ABORT, 'lorafleet registry: rows of {table} are immutable'); END"
            )
    else:  # pragma: no cover - the registry refuses other backends before migrating
        raise RuntimeError(f"registry migrations support sqlite and postgresql, not {dialect}")


def downgrade() -> None:
    """Drop everything :func:`upgrade` created (the registry's data goes with it)."""
    dialect = op.get_bind().dialect.name
    for table in _IMMUTABLE:
        op.execute(
            f"DROP TRIGGER IF EXISTS {table}_immutable"
            + (f" ON {table}" if dialect == "postgresql" else "")
        )
    if dialect == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS lorafleet_refuse_update()")
    for table in (
        "blobs",
        "rounds",
        "active_priors",
        "prior_versions",
        "evaluations",
        "adapter_versions",
        "adapters",
        "users",
        "specs",
    ):
        op.drop_table(table)
