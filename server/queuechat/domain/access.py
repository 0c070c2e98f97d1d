"""Who may see and change which conversation: the checks every path shares."""

from __future__ import annotations

from sqlmodel import Session

from ..errors import denied, not_found
from ..store.models import Conversation
from .read import get, has_pending_invite_for, is_participant, pending_invite
from .tx import Tx
from .views import AgentPrincipal, CustomerPrincipal


def require_member(tx: Tx, who: AgentPrincipal, conversation_id: str) -> Conversation:
    conv = get(tx.session, Conversation, conversation_id) if conversation_id else None
    if conv is None:
        raise not_found(
            "CONVERSATION_NOT_FOUND", f"No conversation {conversation_id!r}.", conversation_id=conversation_id
        )
    if not is_participant(tx.session, conversation_id, who.agent_id):
        raise denied(
            "NOT_A_PARTICIPANT", "You are not in this conversation.", conversation_id=conversation_id
        )
    return conv


def can_read(s: Session, who: AgentPrincipal, conversation_id: str) -> bool:
    return bool(
        is_participant(s, conversation_id, who.agent_id) or has_pending_invite_for(s, conversation_id, who.agent_id)
    )


def readable_conversation(s: Session, who: AgentPrincipal | CustomerPrincipal, conversation_id: str) -> Conversation:
    """Agents read conversations they are in or invited to; customers their own."""
    conv = get(s, Conversation, conversation_id) if conversation_id else None
    if isinstance(who, CustomerPrincipal):
        if conv is None or who.conversation_id != conversation_id:
            raise denied("NOT_YOUR_CONVERSATION", "This token is not for that conversation.")
        return conv
    if conv is None:
        raise not_found(
            "CONVERSATION_NOT_FOUND", f"No conversation {conversation_id!r}.", conversation_id=conversation_id
        )
    if not can_read(s, who, conversation_id):
        raise denied("NOT_A_PARTICIPANT", "You are not in this conversation.", conversation_id=conversation_id)
    return conv


def stream_access(s: Session, who: AgentPrincipal | CustomerPrincipal, conversation_id: str) -> str:
    """Check who may stream; for an agent who is only invited, the id of that invite (else "")."""
    readable_conversation(s, who, conversation_id)
    if isinstance(who, CustomerPrincipal) or is_participant(s, conversation_id, who.agent_id):
        return ""
    inv = pending_invite(s, conversation_id)
    return inv.id if inv is not None and inv.invitee_id == who.agent_id else ""
