"""Federated evaluation of prior versions and the promotion rule's decisions.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-10

Each new prior version is scored by devices on their validation splits
(``prior_evaluations``: mean and spread per round) and becomes active only if the
promotion rule says so; every verdict, the policy's or an operator's, is appended to
``prior_decisions`` with its reason. Only additions: existing priors simply have no
evaluation or decision rows (the console shows them as undecided).
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _table(name: str, *columns: sa.Column[Any], refs: dict[str, str]) -> None:
    """Create ``name`` with an autoincrement id, ``columns``, and a named FK per ``refs``."""
    keys = [
        sa.ForeignKeyConstraint(
            [column], [target], name=f"fk_{name}_{column}_{target.split('.')[0]}"
        )
        for column, target in refs.items()
    ]
    op.create_table(
        name,
        sa.Column("id", ID, primary_key=True, autoincrement=True),
        *columns,
        sa.PrimaryKeyConstraint("id", name=f"pk_{name}"),
        *keys,
        sqlite_autoincrement=True,
    )


def upgrade() -> None:
    """Create ``prior_evaluations`` and ``prior_decisions``."""

    def when() -> sa.Column[Any]:
        return sa.Column("created_at", sa.DateTime(timezone=True), nullable=False)

    _table(
        "prior_evaluations",
        sa.Column("prior_id", ID, nullable=False),
        sa.Column("devices", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(32), nullable=False),
        sa.Column("round", sa.Integer(), nullable=True),
        sa.Column("metrics_json", sa.Text(), nullable=False),
        when(),
        refs={"prior_id": "prior_versions.id"},
    )
    op.create_index("ix_prior_evaluations_prior_id_id", "prior_evaluations", ["prior_id", "id"])
    _table(
        "prior_decisions",
        sa.Column("spec_fingerprint", sa.String(64), nullable=False),
        sa.Column("prior_id", ID, nullable=False),
        sa.Column("against_id", ID, nullable=True),
        sa.Column("round", sa.Integer(), nullable=True),
        sa.Column("decision", sa.String(16), nullable=False),
        sa.Column("decided_by", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        *(
            sa.Column(n, sa.Float(), nullable=True)
            for n in ("candidate_score", "active_score", "tolerance")
        ),
        when(),
        refs={
            "spec_fingerprint": "specs.fingerprint",
            "prior_id": "prior_versions.id",
            "against_id": "prior_versions.id",
        },
    )
    for columns in (["prior_id", "id"], ["spec_fingerprint", "id"]):
        op.create_index(f"ix_prior_decisions_{'_'.join(columns)}", "prior_decisions", columns)


def downgrade() -> None:
    """Drop both tables (the scores and verdicts go; the priors stay)."""
    op.drop_table("prior_decisions")
    op.drop_table("prior_evaluations")
