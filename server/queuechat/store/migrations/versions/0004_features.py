"""Issue #13: read cursors, supervisor profiles and monitor sessions, wrap-up codes, customer ratings.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02

Every model change of the features branch is in this one revision (0003 on that branch; 0004 once merged
after the cluster's 0003).
Plain ADD COLUMN and CREATE TABLE, which SQLite does without copying a table; existing rows get the
defaults: no queue requires a wrap-up code, no profile supervises, no conversation is rated or wrapped up.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_CONVERSATION_COLUMNS = (
    ("ended_at", sa.DateTime(timezone=True)),
    ("wrap_up_code_id", sa.String()),
    ("wrap_up_code_name", sa.String()),
    ("wrap_up_note", sa.Text()),
    ("wrap_up_agent_id", sa.String()),
    ("wrap_up_at", sa.DateTime(timezone=True)),
    ("rating_score", sa.Integer()),
    ("rating_comment", sa.Text()),
    ("rated_at", sa.DateTime(timezone=True)),
    ("rating_request_id", sa.String()),
)


def upgrade() -> None:
    op.add_column("queue", sa.Column("wrap_up_required", sa.Boolean(), server_default=sa.text("false"), nullable=False))
    op.add_column("profile", sa.Column("supervisor", sa.Boolean(), server_default=sa.text("false"), nullable=False))
    for name, type_ in _CONVERSATION_COLUMNS:
        op.add_column("conversation", sa.Column(name, type_, nullable=True))
    # The supervisor figures count ratings of the last 15 minutes; the admin list filters by wrap-up code.
    op.create_index(op.f("ix_conversation_rated_at"), "conversation", ["rated_at"], unique=False)
    op.create_index(op.f("ix_conversation_wrap_up_code_id"), "conversation", ["wrap_up_code_id"], unique=False)
    op.create_table(
        "wrap_up_code",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("display_name", sa.String(), nullable=False),
        sa.Column("queue_id", sa.String(), nullable=True),
        sa.ForeignKeyConstraint(["queue_id"], ["queue.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "read_cursor",
        sa.Column("conversation_id", sa.String(), nullable=False),
        sa.Column("reader", sa.String(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("read_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("public_seq", sa.Integer(), nullable=False),
        sa.Column("public_read_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["conversation_id"], ["conversation.id"]),
        sa.PrimaryKeyConstraint("conversation_id", "reader"),
    )
    op.create_table(
        "monitor_session",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("conversation_id", sa.String(), nullable=False),
        sa.Column("agent_id", sa.String(), nullable=False),
        sa.Column("session_id", sa.String(), nullable=False),
        sa.Column("node_id", sa.String(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("ended_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["agent_id"], ["agent.id"]),
        sa.ForeignKeyConstraint(["conversation_id"], ["conversation.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_monitor_session_conversation_id"), "monitor_session", ["conversation_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_monitor_session_conversation_id"), table_name="monitor_session")
    op.drop_table("monitor_session")
    op.drop_table("read_cursor")
    op.drop_table("wrap_up_code")
    op.drop_index(op.f("ix_conversation_wrap_up_code_id"), table_name="conversation")
    op.drop_index(op.f("ix_conversation_rated_at"), table_name="conversation")
    # Batch mode: SQLite copies the table to drop a column.
    with op.batch_alter_table("conversation") as batch:
        for name, _ in reversed(_CONVERSATION_COLUMNS):
            batch.drop_column(name)
    with op.batch_alter_table("profile") as batch:
        batch.drop_column("supervisor")
    with op.batch_alter_table("queue") as batch:
        batch.drop_column("wrap_up_required")
