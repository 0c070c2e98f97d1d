"""Cluster: offer-stream leases held by nodes, and attachment bytes in the database.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

stream_lease replaces a bare agent_session.stream_count as presence: each open offer stream is a row
that names its node and expires unless that node renews it. blob_chunk keeps attachment bytes in the
database when it is PostgreSQL (no shared disk between nodes); SQLite keeps them in files.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "stream_lease",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("session_id", sa.String(), nullable=False),
        sa.Column("node_id", sa.String(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["session_id"], ["agent_session.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_stream_lease_session_id"), "stream_lease", ["session_id"], unique=False)
    op.create_index(op.f("ix_stream_lease_node_id"), "stream_lease", ["node_id"], unique=False)
    op.create_index(op.f("ix_stream_lease_expires_at"), "stream_lease", ["expires_at"], unique=False)
    op.create_table(
        "blob_chunk",
        sa.Column("key", sa.String(), nullable=False),
        sa.Column("offset", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("key", "offset"),
    )


def downgrade() -> None:
    op.drop_table("blob_chunk")
    op.drop_index(op.f("ix_stream_lease_expires_at"), table_name="stream_lease")
    op.drop_index(op.f("ix_stream_lease_node_id"), table_name="stream_lease")
    op.drop_index(op.f("ix_stream_lease_session_id"), table_name="stream_lease")
    op.drop_table("stream_lease")
