"""Hardening (commit 263a211): disabled agents and admins, session idle times, configured accounts,
identity-token replay; an index on attachment.sha256.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-02

Until this revision existed, Database.create_all's stop-gap added these columns to old databases; a
database it already brought up to date has no alembic_version and is stamped 0002, not upgraded (see
queuechat.store.migrations.adopt).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Plain ADD COLUMN, which SQLite can do too. Existing rows get false: every account stays enabled
    # until the configuration file says otherwise.
    op.add_column("agent", sa.Column("disabled", sa.Boolean(), server_default=sa.text("false"), nullable=False))
    op.add_column("admin", sa.Column("disabled", sa.Boolean(), server_default=sa.text("false"), nullable=False))
    # NULL: not used since; the idle timeout counts from created_at then.
    op.add_column("admin_session", sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("agent_session", sa.Column("last_seen_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "configured_account",
        sa.Column("kind", sa.String(), nullable=False),
        sa.Column("id", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("kind", "id"),
    )
    op.create_table(
        "identity_token_use",
        sa.Column("jti", sa.String(), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("conversation_id", sa.String(), nullable=False),
        sa.PrimaryKeyConstraint("jti"),
    )
    op.create_index(op.f("ix_identity_token_use_expires_at"), "identity_token_use", ["expires_at"], unique=False)
    # Removing an upload asks whether any other row still names its blob.
    op.create_index(op.f("ix_attachment_sha256"), "attachment", ["sha256"], unique=False)
    # The supervisor figures count offers answered in the last 15 minutes.
    op.create_index("ix_offer_resolved", "offer", ["kind", "resolved_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_offer_resolved", table_name="offer")
    op.drop_index(op.f("ix_attachment_sha256"), table_name="attachment")
    # Batch mode: SQLite copies the table to drop a column.
    op.drop_index(op.f("ix_identity_token_use_expires_at"), table_name="identity_token_use")
    op.drop_table("identity_token_use")
    op.drop_table("configured_account")
    with op.batch_alter_table("agent_session") as batch:
        batch.drop_column("last_seen_at")
    with op.batch_alter_table("admin_session") as batch:
        batch.drop_column("last_used_at")
    with op.batch_alter_table("admin") as batch:
        batch.drop_column("disabled")
    with op.batch_alter_table("agent") as batch:
        batch.drop_column("disabled")
