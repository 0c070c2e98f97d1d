"""Issue #14: each agent's load kept on its row, and live sessions indexed in routing's order.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05

Routing counted every live agent's open conversations and pending offers on each arrival: linear in the
agents logged in. `agent.load` keeps that count, written by the same writes that change it (under the
routing lock); this revision adds it and fills it in from the rows it counts. `ix_agent_session_idle`
(ended_at, then routing's order) lets routing read live sessions idle longest first and stop at the first
free one.

Stop every node running older code first: from here on the count is kept by the writes, which older code
does not do (docs/operations.md).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# As read.agent_loads counts: a seat per open conversation the agent is in and per pending offer.
_FILL = """
UPDATE agent SET load =
    (SELECT count(*) FROM participant JOIN conversation ON conversation.id = participant.conversation_id
      WHERE participant.agent_id = agent.id AND participant.left_at IS NULL AND conversation.status = 'active')
  + (SELECT count(*) FROM offer WHERE offer.agent_id = agent.id AND offer.status = 'pending')
"""


def upgrade() -> None:
    op.add_column("agent", sa.Column("load", sa.Integer(), server_default=sa.text("0"), nullable=False))
    op.execute(_FILL)
    op.create_index(
        "ix_agent_session_idle", "agent_session", ["ended_at", "last_offer_at", "created_at", "id"], unique=False
    )


def downgrade() -> None:
    op.drop_index("ix_agent_session_idle", table_name="agent_session")
    with op.batch_alter_table("agent") as batch:
        batch.drop_column("load")
