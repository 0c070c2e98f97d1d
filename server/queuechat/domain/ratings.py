"""The customer's rating of a chat: once, after it ended, within the rating window."""

from __future__ import annotations

from datetime import timedelta

from sqlmodel import select

from ..errors import denied, invalid, precondition
from ..store.models import Conversation, Participant
from .read import rating_view
from .tx import Tx
from .views import CustomerPrincipal, RatingView

MAX_COMMENT = 1000


def rate(tx: Tx, who: CustomerPrincipal, conversation_id: str, request_id: str, score: int, comment: str) -> RatingView:
    if not 1 <= score <= 5:
        raise invalid("BAD_SCORE", "score must be 1 to 5.", score=score)
    if len(comment) > MAX_COMMENT:
        raise invalid(
            "COMMENT_TOO_LONG", f"A comment may have at most {MAX_COMMENT} characters; this one has {len(comment)}.",
            limit=MAX_COMMENT,
        )  # fmt: skip
    s = tx.session
    conv = s.get(Conversation, conversation_id) if conversation_id else None
    if conv is None or who.conversation_id != conversation_id:
        raise denied("NOT_YOUR_CONVERSATION", "This token is not for that conversation.")
    prior = rating_view(conv)
    if prior is not None:
        if request_id and conv.rating_request_id == request_id:
            return prior  # a retry
        raise precondition("ALREADY_RATED", "You have rated this chat already.")
    ended = conv.ended_at or conv.closed_at
    if ended is None:
        raise precondition("CHAT_NOT_ENDED", "A chat can be rated once it has ended.")
    if s.exec(select(Participant.id).where(Participant.conversation_id == conv.id)).first() is None:
        raise precondition("NOT_ANSWERED", "No agent took this chat: there is nothing to rate.")
    window = tx.settings.rating_window
    if tx.now - ended > timedelta(seconds=window):
        raise precondition(
            "RATING_WINDOW_CLOSED", f"A chat can be rated for {window:g} seconds after it ended.", window=window
        )
    comment = comment.strip()
    conv.rating_score, conv.rating_comment, conv.rated_at = score, comment or None, tx.now
    conv.rating_request_id = request_id or None
    s.add(conv)
    tx.count("ratings", queue=conv.queue_id, score=str(score))
    tx.log("chat.rated", conversation_id=conv.id, queue_id=conv.queue_id, score=score)
    return RatingView(score, comment, tx.now)
