"""Write paths on a conversation: start, messages, offer menus, end, leave, close."""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Integer, String, bindparam, column, delete, func, insert, text, update
from sqlmodel import Session, col, or_, select
from sqlmodel.sql.sqltypes import UTCDateTime

from ..config import Limits
from ..errors import ChatError, denied, exhausted, invalid, not_found, precondition, short, unauthenticated
from ..store.fast import Fast
from ..store.models import (
    Agent,
    Conversation,
    CustomerVariable,
    Event,
    IdentityTokenUse,
    OfferMenu,
    Participant,
    PredefinedMessage,
    ProfileQueue,
    Queue,
    WrapUpCode,
    table,
)
from . import attachments, routing, supervision
from .access import can_read, require_member
from .log import (
    agent_participant,
    append_event,
    conv_topic,
    customer_named,
    customer_participant,
    event_view,
    find_request,
    insert_event,
    insert_event_once,
    json_around,
)
from .read import QUEUE_NAME, active_agents, agent_view, connection, conversation_view, must_get, variables_json
from .tx import Tx, locks_conversation, routing_free
from .views import (
    AgentPrincipal,
    ConversationView,
    CustomerPrincipal,
    EventView,
    ParticipantView,
    PredefinedView,
    VariableView,
)

Sender = AgentPrincipal | CustomerPrincipal


def start_chat(
    tx: Tx,
    queue_id: str,
    request_id: str,
    unverified: dict[str, str],
    verified: dict[str, str],
    *,
    identity_jti: str | None = None,
    identity_expires: datetime | None = None,
    max_waiting: int = 0,
) -> ConversationView:
    """A retry (same request_id) returns the chat it made, before any other check: a full queue or a
    used identity token does not turn a retry into a refusal."""
    s = tx.session
    c = tx.conn  # Core statements throughout: every chat starts here
    if request_id:
        prior_id = _BY_START_REQUEST.run(c, {"request_id": request_id}).scalar()
        if prior_id is not None:
            prior = must_get(s, Conversation, prior_id)
            if prior.queue_id != queue_id:
                raise invalid("REQUEST_ID_REUSED", "This request_id was used for a chat in another queue.")
            return conversation_view(s, prior, for_agent=False)
    queue_name = QUEUE_NAME.run(c, {"queue": queue_id}).scalar() if queue_id else None
    if queue_name is None:
        raise not_found("QUEUE_NOT_FOUND", f"There is no queue {short(queue_id)!r}.", queue_id=queue_id)
    now = tx.now
    if max_waiting and _waiting(tx, queue_id) >= max_waiting:
        message = "Too many chats are waiting in this queue; try again later."
        raise exhausted("QUEUE_FULL", message, retry_after=30.0, queue_id=queue_id)
    conversation_id = uuid.uuid4().hex
    if identity_jti is not None:
        if s.get(IdentityTokenUse, identity_jti) is not None:
            raise unauthenticated("IDENTITY_TOKEN_REPLAYED", "This identity token has been used already.")
        s.add(IdentityTokenUse(jti=identity_jti, expires_at=identity_expires or now, conversation_id=conversation_id))
    merged = {k: VariableView(k, v, False) for k, v in unverified.items()}
    merged.update({k: VariableView(k, v, True) for k, v in verified.items()})  # verified wins
    variables = tuple(merged[k] for k in sorted(merged))
    name = merged["name"].value if "name" in merged else ""
    # A new log: its first two events take seq 1 and 2 directly.
    c = tx.conn  # the identity token's row, if any, goes in first
    _INSERT_CONVERSATION.run(
        c,
        {
            "id": conversation_id,
            "queue_id": queue_id,
            "status": "queued",
            "customer_connected": True,
            "customer_name": name,
            "created_at": now,
            "enqueued_at": now,
            "last_seq": 2,
            "start_request_id": request_id or None,
        },
    )
    if variables:
        c.execute(
            insert(CustomerVariable),
            [
                {"conversation_id": conversation_id, "name": v.name, "value": v.value, "authenticated": v.authenticated}
                for v in variables
            ],
        )
    queue = {"queue_id": queue_id, "display_name": queue_name}
    customer = customer_named(name)
    insert_event(tx, conversation_id, 1, "chat_started", {"queue": queue, "variables": variables_json(variables)},
                 actor="customer", now=now)  # fmt: skip
    insert_event(tx, conversation_id, 2, "participant_joined", {"participant": customer.to_json()},
                 actor="customer", now=now)  # fmt: skip
    tx.needs_dispatch([queue_id])
    tx.queue_changed(queue_id)  # those waiting see the count grow
    tx.count("chats_started", queue=queue_id)
    tx.log("chat.started", conversation_id=conversation_id, queue_id=queue_id, identified=bool(verified))
    return ConversationView(
        id=conversation_id,
        queue_id=queue_id,
        queue_name=queue_name,
        status="queued",
        customer_connected=True,
        variables=variables,
        agents=(),
        last_seq=2,
        created_at=now,
        closed_at=None,
    )


_BY_START_REQUEST = Fast(select(Conversation.id).where(Conversation.start_request_id == bindparam("request_id")))
_INSERT_CONVERSATION = Fast(insert(Conversation))


def forget_identity_tokens(tx: Tx) -> int:
    """Uses of identity tokens that have expired since: a replay of those fails on exp anyway."""
    gone = tx.conn.execute(delete(IdentityTokenUse).where(col(IdentityTokenUse.expires_at) < tx.now))
    return gone.rowcount


def _waiting(tx: Tx, queue_id: str) -> int:
    return tx.conn.execute(_WAITING, {"q": queue_id}).scalar_one()


_WAITING = (
    select(func.count())
    .select_from(Conversation)
    .where(col(Conversation.status) == "queued", col(Conversation.queue_id) == bindparam("q"))
)


def _require_open(conv: Conversation) -> None:
    if conv.status == "closed":
        raise precondition("CONVERSATION_CLOSED", "The conversation is closed.", conversation_id=conv.id)


def _require_customer(tx: Tx, who: CustomerPrincipal, conversation_id: str) -> Conversation:
    conv = tx.session.get(Conversation, conversation_id)
    if conv is None or who.conversation_id != conversation_id:
        raise denied("NOT_YOUR_CONVERSATION", "This token is not for that conversation.")
    return conv


def _actor(who: Sender) -> str:
    return f"agent:{who.agent_id}" if isinstance(who, AgentPrincipal) else "customer"


@routing_free  # it decides nothing routing reads; what it checks, it checks under the conversation's row lock
@locks_conversation
def send_message(
    tx: Tx,
    who: Sender,
    conversation_id: str,
    request_id: str,
    text: str,
    private: bool,
    predefined_id: str,
    attachment_ids: Sequence[str] = (),
) -> EventView:
    """The hot path: two Core statements (the seq claim, which also reads the conversation and the agent's
    name, and the insert, which also tells a retry), one on PostgreSQL for a plain message (_send_plain),
    the ORM only for predefined messages and files.

    On PostgreSQL the claim's reads other than the row itself are of the statement's snapshot, from before
    any wait for the row's lock: a seq claimed in between (another node's leave, say) makes it check again."""
    c = tx.conn
    actor = _actor(who)
    if isinstance(who, CustomerPrincipal) and who.conversation_id != conversation_id:
        raise denied("NOT_YOUR_CONVERSATION", "This token is not for that conversation.")
    pg = c.dialect.name == "postgresql"
    if pg and not predefined_id and not attachment_ids and _valid_text(tx.limits, text):
        plain = _send_plain(tx, who, actor, conversation_id, request_id, text, private)
        if plain is not None:
            return plain
    # Take the seq and read the conversation in one statement; a refusal below rolls it back. It holds the
    # conversation's row until commit, so a close, an end or a leave committed by another node is seen below
    # (they claim a seq too) and none can come between these checks and the message.
    agent_id = who.agent_id if isinstance(who, AgentPrincipal) else ""
    conv = (_CLAIM_SEQ_SEEN if pg else _CLAIM_SEQ).run(c, {"c": conversation_id, "a": agent_id}).first()
    agent_name = conv.agent_name if conv is not None else None
    if pg and agent_id and conv is not None and conv.last_seq != conv.seen + 1:
        # Another write claimed a seq while this one waited for the row: membership as it stands now.
        agent_name = c.execute(_MEMBER_NAME_IN_RETURNING, {"c": conversation_id, "a": agent_id}).scalar()

    def retried() -> EventView | None:
        """The event an earlier try of this request stored, if any: then the seq claimed here is given back."""
        prior = find_request(tx, conversation_id, actor, request_id)
        if prior is not None and conv is not None:
            _UNCLAIM_SEQ.run(c, {"c": conversation_id})
        return prior

    def refuse(error: ChatError) -> EventView:
        # A retry of a request that went through is answered as it was, whatever has changed since.
        prior = retried()
        if prior is None:
            raise error
        return prior

    if isinstance(who, AgentPrincipal):
        if conv is None or agent_name is None:
            try:
                require_member(tx, who, conversation_id)  # raises the precise refusal
            except ChatError as e:
                return refuse(e)
            raise LookupError(f"agent {who.agent_id} is in {conversation_id} without a name")  # not reached
        sender = ParticipantView("agent", who.agent_id, agent_name)
    if conv is None:
        return refuse(not_found("CONVERSATION_NOT_FOUND", f"No conversation {conversation_id!r}."))
    if conv.status == "closed":
        return refuse(
            precondition("CONVERSATION_CLOSED", "The conversation is closed.", conversation_id=conversation_id)
        )
    if isinstance(who, CustomerPrincipal):
        if not conv.customer_connected:
            return refuse(precondition("CHAT_ENDED", "You have ended this chat."))
        sender = ParticipantView("customer", display_name=conv.customer_name or "Customer")
    if predefined_id:
        if not isinstance(who, AgentPrincipal):  # not reached: the customer API has no predefined messages
            raise TypeError("only agents send predefined messages")
        pm = _available_predefined(tx.session, who, tx.session.get(Conversation, conversation_id)).get(predefined_id)
        if pm is None:
            return refuse(
                not_found(
                    "PREDEFINED_MESSAGE_NOT_FOUND",
                    f"No predefined message {predefined_id!r} is available to you here.",
                    predefined_message_id=predefined_id,
                )
            )
        text = text or pm.body
    if request_id and (attachment_ids or predefined_id) and (prior := retried()) is not None:
        return prior  # files are attached by this write: a retry must be found before, not after
    files = []
    if attachment_ids:
        files = attachments.attach(tx, who, conversation_id, list(attachment_ids), "agents" if private else "all")
    if not files or text:
        try:
            check_text(tx.limits, text)
        except ChatError as e:
            return refuse(e)
    message: dict[str, Any] = {
        "message_id": uuid.uuid4().hex,
        "sender": sender.to_json(),
        "text": text,
        "visibility": "VISIBILITY_AGENTS_ONLY" if private else "VISIBILITY_ALL",
    }
    if predefined_id:
        message["predefined_message_id"] = predefined_id
    if files:
        message["attachments"] = [attachments.attachment_json(f) for f in files]
    visibility = "agents" if private else "all"
    if request_id:
        once = insert_event_once(
            tx, conversation_id, conv.last_seq, "message", message,
            actor=actor, visibility=visibility, request_id=request_id,
        )  # fmt: skip
        if once is None:  # a retry: the request went through before
            prior = retried()
            if prior is None:  # not reached: the conflict was that row
                raise LookupError(f"request {request_id} of {actor} conflicted with no event")
            return prior
        event = once
    else:
        event = insert_event(tx, conversation_id, conv.last_seq, "message", message, actor=actor, visibility=visibility)
    for f in files:
        f.event_seq = event.seq
    tx.count("messages", sender=actor.partition(":")[0], visibility=visibility)
    return event


# The conversation's seq as this statement's snapshot saw it, before any wait for the row's lock. The
# statement's other reads (membership, the sender's name) are of that snapshot too, while the row itself is
# read again after the wait: a seq claimed in between (a leave, a close, an end all claim one) means they
# may be stale, and the send checks again with a fresh statement.
_SEEN_SEQ = "SELECT seen.last_seq FROM conversation seen WHERE seen.id = :c"
# Written out: SQLAlchemy names RETURNING's columns without their tables, which would make `id` ambiguous.
_MEMBER_NAME_IN_RETURNING = text(
    "SELECT a.display_name FROM agent a JOIN participant p ON p.agent_id = a.id"
    " WHERE p.conversation_id = :c AND p.agent_id = :a AND p.left_at IS NULL"
).columns(column("display_name", String))
_CLAIM = (
    update(Conversation)
    .where(col(Conversation.id) == bindparam("c"))
    .values(last_seq=Conversation.last_seq + 1)
    .returning(
        col(Conversation.last_seq),
        col(Conversation.status),
        col(Conversation.customer_connected),
        col(Conversation.customer_name),
        _MEMBER_NAME_IN_RETURNING.scalar_subquery().label("agent_name"),  # NULL: a customer, or no member
    )
)
_CLAIM_SEQ = Fast(_CLAIM)
_CLAIM_SEQ_SEEN = Fast(
    _CLAIM.returning(text(_SEEN_SEQ).columns(column("seen", Integer)).scalar_subquery().label("seen"))
)
# Gives back a seq this write claimed and does not use (a retry, found after the claim). The row is still
# locked by this transaction, so nobody has claimed a seq after it.
_UNCLAIM_SEQ = Fast(
    update(Conversation).where(col(Conversation.id) == bindparam("c")).values(last_seq=Conversation.last_seq - 1)
)


def _send_plain(
    tx: Tx, who: Sender, actor: str, conversation_id: str, request_id: str, text: str, private: bool
) -> EventView | None:
    """The common case of send_message on PostgreSQL, where every statement is a round trip: the seq claim,
    the checks and the insert in one statement. None when it is not the common case (no such conversation,
    a refusal, a retry): then nothing is left changed and the general path answers precisely."""
    agent_id = who.agent_id if isinstance(who, AgentPrincipal) else ""
    visibility = "agents" if private else "all"
    sender = ParticipantView("agent", agent_id, "") if agent_id else ParticipantView("customer", display_name="")
    message: dict[str, Any] = {
        "message_id": uuid.uuid4().hex,
        "sender": sender.to_json(),
        "text": text,
        "visibility": "VISIBILITY_AGENTS_ONLY" if private else "VISIBILITY_ALL",
    }
    # The sender's name is the database's (read in the claim's statement): the statement splices it in.
    head, tail = json_around(message, "display_name", "")
    row = tx.conn.execute(
        _SEND_AS_AGENT if agent_id else _SEND_AS_CUSTOMER,
        {
            "c": conversation_id,
            "a": agent_id,
            "visibility": visibility,
            "created_at": tx.now,
            "actor": actor,
            "request_id": request_id or None,
            "head": head,
            "tail": tail,
        },
    ).first()
    if row is None:
        return None  # no such conversation: nothing claimed
    if row.stored is None:
        _UNCLAIM_SEQ.run(tx.conn, {"c": conversation_id})  # still locked by this transaction
        return None
    message["sender"]["display_name"] = row.name
    if tx.check_event is not None:
        tx.check_event("event", "message", message)
    view = EventView(conversation_id, row.last_seq, "message", visibility, tx.now, message)
    tx.publish(conv_topic(conversation_id), view)
    tx.count("messages", sender=actor.partition(":")[0], visibility=visibility)
    return view


def _send_statement(allowed: str, name: str) -> Any:
    """Claim the seq, read who may send and the sender's name, and store the message if allowed: one
    statement. `stored` is NULL when it was not allowed, when another write claimed a seq while this one
    waited for the row (what it read may be stale), or when the request id is in the log already."""
    return text(
        "WITH claim AS ("
        " UPDATE conversation SET last_seq = last_seq + 1 WHERE id = :c"
        " RETURNING last_seq, status, customer_connected, customer_name,"
        " (SELECT a.display_name FROM agent a JOIN participant p ON p.agent_id = a.id"
        "   WHERE p.conversation_id = :c AND p.agent_id = :a AND p.left_at IS NULL) AS agent_name,"
        f" ({_SEEN_SEQ}) AS seen"
        "), stored AS ("
        " INSERT INTO conversation_event (conversation_id, seq, kind, visibility, created_at, actor, request_id,"
        "  payload)"
        f" SELECT :c, claim.last_seq, 'message', :visibility, :created_at, :actor, :request_id,"
        f"  :head || to_json(CAST({name} AS text))::text || :tail"
        f" FROM claim WHERE claim.status <> 'closed' AND {allowed} AND claim.last_seq = claim.seen + 1"
        " ON CONFLICT (conversation_id, actor, request_id) DO NOTHING"
        " RETURNING seq"
        f") SELECT claim.last_seq, {name} AS name, (SELECT seq FROM stored) AS stored FROM claim"
    ).bindparams(bindparam("created_at", type_=UTCDateTime()))  # aware UTC, as the ORM binds it


_SEND_AS_AGENT = _send_statement("claim.agent_name IS NOT NULL", "claim.agent_name")
_SEND_AS_CUSTOMER = _send_statement("claim.customer_connected", "coalesce(nullif(claim.customer_name, ''), 'Customer')")


def _valid_text(limits: Limits, text: str) -> bool:
    try:
        check_text(limits, text)
    except ChatError:
        return False
    return True


def check_text(limits: Limits, text: str) -> None:
    if not text or not text.strip():
        raise invalid("EMPTY_MESSAGE", "A message needs some text.")
    limit = limits.max_message_chars
    if len(text) > limit:
        raise invalid(
            "MESSAGE_TOO_LONG", f"A message may have at most {limit} characters; this one has {len(text)}.", limit=limit
        )


def _available_predefined(s: Session, who: AgentPrincipal, conv: Conversation | None) -> dict[str, PredefinedMessage]:
    """Global ones, those of the agent's profile, and those of the profile's queues (or of conv's queue)."""
    if conv is not None:
        queues = [conv.queue_id]
    else:
        queues = list(s.exec(select(ProfileQueue.queue_id).where(ProfileQueue.profile_id == who.profile_id)).all())
    rows = s.exec(
        select(PredefinedMessage)
        .where(
            or_(
                (col(PredefinedMessage.queue_id).is_(None)) & (col(PredefinedMessage.profile_id).is_(None)),
                PredefinedMessage.profile_id == who.profile_id,
                col(PredefinedMessage.queue_id).in_(queues),
            )
        )
        .order_by(PredefinedMessage.title, PredefinedMessage.id)
    ).all()
    return {r.id: r for r in rows}


def list_predefined(s: Session, who: AgentPrincipal, conversation_id: str) -> list[PredefinedView]:
    conv = None
    if conversation_id:
        conv = s.get(Conversation, conversation_id)
        if conv is None or not can_read(s, who, conversation_id):
            raise not_found("CONVERSATION_NOT_FOUND", f"No conversation {conversation_id!r} of yours.")
    return [
        PredefinedView(m.id, m.title, m.body, m.queue_id, m.profile_id)
        for m in _available_predefined(s, who, conv).values()
    ]


def send_offer_menu(
    tx: Tx,
    who: AgentPrincipal,
    conversation_id: str,
    request_id: str,
    prompt: str,
    options: list[tuple[str, str]],
) -> EventView:
    conv = require_member(tx, who, conversation_id)
    prior = find_request(tx, conversation_id, _actor(who), request_id)
    if prior is not None:
        return prior
    _require_open(conv)
    if not conv.customer_connected:
        raise precondition("CHAT_ENDED", "The customer has ended the chat.")
    if not prompt.strip():
        raise invalid("EMPTY_PROMPT", "An offer menu needs a prompt.")
    if len(prompt) > tx.limits.max_message_chars:
        raise invalid("PROMPT_TOO_LONG", f"The prompt may have at most {tx.limits.max_message_chars} characters.")
    if not 2 <= len(options) <= 10:
        raise invalid("OPTION_COUNT", f"An offer menu has 2 to 10 options, not {len(options)}.", count=len(options))
    ids = [o[0] for o in options]
    if any(not i.strip() or len(i) > 64 for i in ids) or len(set(ids)) != len(ids):
        raise invalid("OPTION_IDS", "Option ids must be unique, non-empty and at most 64 characters.")
    if any(not label.strip() or len(label) > 200 for _, label in options):
        raise invalid("OPTION_LABELS", "Option labels must be non-empty and at most 200 characters.")
    opts = [{"option_id": i, "label": label} for i, label in options]
    menu = OfferMenu(id=uuid.uuid4().hex, conversation_id=conv.id, prompt=prompt, options=json.dumps(opts))
    tx.session.add(menu)
    sender = agent_participant(must_get(tx.session, Agent, who.agent_id))
    return append_event(
        tx,
        conv,
        "offer_menu",
        {"menu_id": menu.id, "prompt": prompt, "options": opts, "sender": sender.to_json()},
        actor=_actor(who),
        request_id=request_id,
    )


def choose_option(
    tx: Tx, who: CustomerPrincipal, conversation_id: str, menu_id: str, option_id: str
) -> EventView:
    conv = _require_customer(tx, who, conversation_id)
    _require_open(conv)
    if not conv.customer_connected:
        raise precondition("CHAT_ENDED", "You have ended this chat.")
    menu = tx.session.get(OfferMenu, menu_id) if menu_id else None
    if menu is None or menu.conversation_id != conversation_id:
        raise not_found("MENU_NOT_FOUND", f"No offer menu {menu_id!r} in this chat.", menu_id=menu_id)
    if menu.chosen_option_id is not None:
        if menu.chosen_option_id == option_id:  # a retry: the same answer again
            prior = _chosen_event(tx, conversation_id, menu_id)
            if prior is not None:
                return prior
        raise precondition(
            "OPTION_ALREADY_CHOSEN",
            "This menu has been answered already.",
            menu_id=menu_id,
            chosen=menu.chosen_option_id,
        )
    label = {o["option_id"]: o["label"] for o in json.loads(menu.options)}.get(option_id)
    if label is None:
        raise invalid("UNKNOWN_OPTION", f"The menu has no option {option_id!r}.", option_id=option_id)
    now = tx.now
    menu.chosen_option_id = option_id
    menu.chosen_at = now
    tx.session.add(menu)
    return append_event(
        tx,
        conv,
        "option_chosen",
        {
            "menu_id": menu_id,
            "option_id": option_id,
            "label": label,
            "chooser": customer_participant(conv).to_json(),
        },
        actor="customer",
        now=now,
    )


def _chosen_event(tx: Tx, conversation_id: str, menu_id: str) -> EventView | None:
    rows = tx.conn.execute(
        table(Event).select().where(col(Event.conversation_id) == conversation_id, col(Event.kind) == "option_chosen")
    )
    return next((v for v in map(event_view, rows) if v.payload["menu_id"] == menu_id), None)


def end_chat(tx: Tx, who: CustomerPrincipal, conversation_id: str) -> ConversationView:
    """The customer leaves. Agents are told; they close the conversation without confirmation."""
    s = tx.session
    conv = _require_customer(tx, who, conversation_id)
    if conv.customer_connected and conv.status != "closed":
        now = tx.now
        conv.customer_connected = False
        conv.ended_at = now
        customer = customer_participant(conv).to_json()
        append_event(tx, conv, "chat_ended", {"ended_by": customer}, actor="customer", now=now)
        if conv.status == "queued":
            routing.withdraw_conversation_offers(tx, conv.id, "customer_left", now)
            _close(tx, conv, customer, "customer", now)
            tx.queue_changed(conv.queue_id)
            tx.needs_dispatch()
    return conversation_view(s, conv, for_agent=False)


def leave(tx: Tx, who: AgentPrincipal, conversation_id: str) -> None:
    s = tx.session
    conv = require_member(tx, who, conversation_id)
    _require_open(conv)
    others = [a for a in active_agents(s, conversation_id) if a.id != who.agent_id]
    if not others and conv.customer_connected:
        raise precondition(
            "LAST_AGENT_MUST_CLOSE",
            "You are the last agent and the customer is still connected: close the conversation instead.",
        )
    now = tx.now
    agent = must_get(s, Agent, who.agent_id)
    part = s.exec(
        select(Participant).where(
            Participant.conversation_id == conversation_id,
            Participant.agent_id == who.agent_id,
            col(Participant.left_at).is_(None),
        )
    ).one()
    if not others:  # the customer is gone too: leaving is closing
        if _wrap_up_required(tx.session, conv):
            raise precondition(
                "WRAP_UP_REQUIRED",
                "Leaving would close the conversation, and its queue needs a wrap-up code: close it with one.",
                conversation_id=conversation_id,
            )
        _close(tx, conv, agent_participant(agent).to_json(), f"agent:{agent.id}", now)
    else:
        part.left_at = now
        s.add(part)
        routing.take_seats(tx, agent.id, -1)
        append_event(
            tx,
            conv,
            "participant_left",
            {"participant": agent_participant(agent).to_json()},
            actor=f"agent:{agent.id}",
            now=now,
        )
    tx.needs_dispatch()


MAX_WRAP_UP_NOTE = 1000


def _wrap_up_required(s: Session, conv: Conversation) -> bool:
    return bool(_WRAP_UP_REQUIRED.run(connection(s), {"queue": conv.queue_id}).scalar())


_WRAP_UP_REQUIRED = Fast(select(Queue.wrap_up_required).where(Queue.id == bindparam("queue")))


def wrap_up_codes(s: Session, queue_id: str) -> list[WrapUpCode]:
    """The codes for a queue: the global ones and its own."""
    return list(
        s.exec(
            select(WrapUpCode)
            .where(or_(col(WrapUpCode.queue_id).is_(None), WrapUpCode.queue_id == queue_id))
            .order_by(WrapUpCode.display_name, WrapUpCode.id)
        ).all()
    )


def list_wrap_up_codes(s: Session, who: AgentPrincipal, conversation_id: str) -> tuple[list[WrapUpCode], bool]:
    conv = s.get(Conversation, conversation_id) if conversation_id else None
    if conv is None or not can_read(s, who, conversation_id):
        raise not_found("CONVERSATION_NOT_FOUND", f"No conversation {short(conversation_id)!r} of yours.")
    return wrap_up_codes(s, conv.queue_id), _wrap_up_required(s, conv)


def close(
    tx: Tx, who: AgentPrincipal, conversation_id: str, confirm: bool, wrap_up_code_id: str = "", wrap_up_note: str = ""
) -> ConversationView:
    """Close for everyone, with an optional wrap-up code and note (a queue may require the code)."""
    s = tx.session
    if len(wrap_up_note) > MAX_WRAP_UP_NOTE:
        raise invalid(
            "WRAP_UP_NOTE_TOO_LONG", f"A wrap-up note may have at most {MAX_WRAP_UP_NOTE} characters.",
            limit=MAX_WRAP_UP_NOTE,
        )  # fmt: skip
    conv = require_member(tx, who, conversation_id)
    if conv.status == "closed":
        return conversation_view(s, conv)
    code = None
    if wrap_up_code_id:
        code = s.get(WrapUpCode, wrap_up_code_id)
        if code is None or code.queue_id not in (None, conv.queue_id):
            raise invalid(
                "UNKNOWN_WRAP_UP_CODE", f"There is no wrap-up code {short(wrap_up_code_id)!r} for this queue.",
                wrap_up_code_id=wrap_up_code_id,
            )  # fmt: skip
    elif _wrap_up_required(s, conv):
        raise precondition(
            "WRAP_UP_REQUIRED", "This queue needs a wrap-up code to close a conversation.", conversation_id=conv.id
        )
    if conv.customer_connected and not confirm:
        raise precondition(
            "CUSTOMER_STILL_CONNECTED",
            "The customer is still connected: confirm to close the chat anyway.",
            conversation_id=conversation_id,
        )
    now = tx.now
    agent = agent_view(s, who.agent_id).to_json()
    if conv.customer_connected:
        also = {"customer_connected": False, "ended_at": now}
        append_event(tx, conv, "chat_ended", {"ended_by": agent}, actor=f"agent:{who.agent_id}", now=now, also=also)
    note = wrap_up_note.strip()
    wrap_up: dict[str, Any] = {}
    if code is not None or note:
        wrap_up = {
            "wrap_up_code_id": code.id if code else None,
            "wrap_up_code_name": code.display_name if code else None,
            "wrap_up_note": note or None,
            "wrap_up_agent_id": who.agent_id,
            "wrap_up_at": now,
        }
    freed = routing.freed_queues(tx, conv.id)  # while its agents are still in it
    _close(tx, conv, agent, f"agent:{who.agent_id}", now, also=wrap_up)
    tx.needs_dispatch(freed)
    return conversation_view(s, conv)


def _close(
    tx: Tx, conv: Conversation, by: dict[str, Any], actor: str, now: datetime, also: dict[str, Any] | None = None
) -> None:
    """Close the conversation, setting the `also` columns (a wrap-up) in the same statement."""
    routing.withdraw_conversation_offers(tx, conv.id, "taken_elsewhere", now)
    if conv.status == "active":
        routing.release_seats(tx, conv.id)
    supervision.stop_monitors(tx, conv)  # their stops go in the log before chat_closed
    closed = {"ended_at": conv.ended_at or now, "status": "closed", "closed_at": now, **(also or {})}
    append_event(tx, conv, "chat_closed", {"closed_by": by}, actor=actor, now=now, also=closed)
    tx.count("chats_closed", queue=conv.queue_id)
    tx.log("chat.closed", conversation_id=conv.id, queue_id=conv.queue_id, closed_by=actor)


# --- reads -----------------------------------------------------------------


def events_after(
    s: Session, conversation_id: str, after_seq: int, public_only: bool, limit: int = 500
) -> list[EventView]:
    q = select(Event).where(Event.conversation_id == conversation_id, Event.seq > after_seq)
    if public_only:
        q = q.where(Event.visibility == "all")
    return [event_view(r) for r in s.exec(q.order_by(col(Event.seq)).limit(limit)).all()]


def agent_conversations(s: Session, who: AgentPrincipal, include_closed: bool) -> list[ConversationView]:
    q = (
        select(Conversation)
        .join(Participant, col(Participant.conversation_id) == Conversation.id)
        .where(Participant.agent_id == who.agent_id, col(Participant.left_at).is_(None))
        .order_by(col(Conversation.created_at))
    )
    if not include_closed:
        q = q.where(Conversation.status != "closed")
    return [conversation_view(s, c) for c in s.exec(q).all()]
