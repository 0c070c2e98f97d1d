"""Supervisor configuration: applying the TOML file, settings, admin sessions,
and AdminService's reads and writes (queues, profiles, agents, predefined
messages, settings, the conversation list)."""

from __future__ import annotations

import base64
import json
import re
import secrets
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, update
from sqlmodel import Session, SQLModel, and_, col, delete, or_, select
from sqlmodel.sql.expression import SelectOfScalar

from ..config import Config, Settings
from ..errors import already_exists, denied, invalid, not_found, precondition, unauthenticated
from ..store.models import (
    Admin,
    AdminSession,
    Agent,
    AgentProfile,
    AgentSession,
    ConfiguredAccount,
    Conversation,
    FeedEvent,
    Invite,
    Offer,
    Participant,
    PredefinedMessage,
    Profile,
    ProfileQueue,
    Queue,
    Setting,
    WrapUpCode,
)
from . import agents
from .auth import Passwords, token_hash
from .read import conversation_view, must_get, profile_queues
from .tx import Tx
from .views import (
    AdminPrincipal,
    AgentAccountView,
    ConversationView,
    PredefinedView,
    ProfileView,
    QueueView,
    WrapUpCodeView,
)

SETTING_KEYS = ("offer_timeout", "reject_cooldown", "stream_grace", "rating_window")
M = TypeVar("M", bound=SQLModel)


# (kind, id) -> (the hash read before the write, the hash to store): worked out off the writer (argon2 is slow
# on purpose), so applying the file never holds the writer, nor a cluster's routing lock, while it hashes.
Hashes = dict[tuple[str, str], tuple[str | None, str]]


def stored_hashes(s: Session) -> dict[tuple[str, str], str]:
    out = {("agent", a.id): a.password_hash for a in s.exec(select(Agent)).all()}
    out.update({("admin", a.id): a.password_hash for a in s.exec(select(Admin)).all()})
    return out


def resolve_hashes(passwords: Passwords, cfg: Config, stored: dict[tuple[str, str], str]) -> Hashes:
    """The hash each configured account gets: the file's own hash; the stored one while it still verifies the
    file's password (the salt is kept); else a new hash. Blocking (argon2): run it on a worker thread."""
    out: Hashes = {}
    accounts = [("agent", a.id, a.password, a.password_hash) for a in cfg.agents]
    accounts += [("admin", a.id, a.password, a.password_hash) for a in cfg.admins]
    for kind, account_id, password, given in accounts:
        current = stored.get((kind, account_id))
        if given:
            out[(kind, account_id)] = (current, given)
        elif current and password is not None and passwords.verify(current, password):
            out[(kind, account_id)] = (current, current)
        else:
            assert password is not None
            out[(kind, account_id)] = (current, passwords.hash(password))
    return out


def _hash(s: Session, hashes: Hashes, kind: str, account_id: str, current: str | None) -> str:
    seen, new = hashes[(kind, account_id)]
    if current is not None and current != seen:
        return current  # another node applied the file in between (its own salt): keep what it stored
    return new


def apply_config(tx: Tx, cfg: Config, hashes: Hashes) -> None:
    """Upsert what the file names. Every node applies it at start, one after the other (the routing lock), so
    it must be idempotent; hashes come from resolve_hashes."""
    s = tx.session
    for q in cfg.queues:
        s.merge(Queue(id=q.id, display_name=q.display_name, wrap_up_required=q.wrap_up_required))
    s.flush()
    for p in cfg.profiles:
        s.merge(Profile(id=p.id, display_name=p.display_name, supervisor=p.supervisor))
        s.flush()
        s.exec(delete(ProfileQueue).where(col(ProfileQueue.profile_id) == p.id))
        for qid in p.queues:
            s.add(ProfileQueue(profile_id=p.id, queue_id=qid))
    s.flush()
    # Whoever knew an old password, or holds a session of an account the file disabled or dropped, is out.
    before = {(r.kind, r.id) for r in s.exec(select(ConfiguredAccount)).all()}
    for a in cfg.agents:
        cur = s.get(Agent, a.id)
        old = cur.password_hash if cur else None
        h = _hash(s, hashes, "agent", a.id, old)
        if cur is None:
            cur = Agent(id=a.id, display_name="", password_hash="")
            s.add(cur)
        # Not merge(): it would set every column, the agent's kept load too.
        cur.display_name, cur.password_hash, cur.max_chats, cur.disabled = a.display_name, h, a.max_chats, a.disabled
        s.flush()
        if old is not None and (h != old or a.disabled):
            agents.end_sessions(tx, a.id)
        s.exec(delete(AgentProfile).where(col(AgentProfile.agent_id) == a.id))
        for pid in a.profiles:
            s.add(AgentProfile(agent_id=a.id, profile_id=pid))
    for ad in cfg.admins:
        cur_admin = s.get(Admin, ad.id)
        old = cur_admin.password_hash if cur_admin else None
        h = _hash(s, hashes, "admin", ad.id, old)
        s.merge(Admin(id=ad.id, password_hash=h, disabled=ad.disabled))
        if old is not None and (h != old or ad.disabled):
            s.exec(delete(AdminSession).where(col(AdminSession.admin_id) == ad.id))
    named = {("agent", a.id) for a in cfg.agents} | {("admin", ad.id) for ad in cfg.admins}
    for kind, account_id in before - named:  # removed from the file: disabled, not deleted (history names it)
        if kind == "agent" and (agent := s.get(Agent, account_id)) is not None:
            agent.disabled = True
            s.add(agent)
            agents.end_sessions(tx, account_id)
        elif kind == "admin" and (adm := s.get(Admin, account_id)) is not None:
            adm.disabled = True
            s.add(adm)
            s.exec(delete(AdminSession).where(col(AdminSession.admin_id) == account_id))
    s.exec(delete(ConfiguredAccount))
    for kind, account_id in sorted(named):
        s.add(ConfiguredAccount(kind=kind, id=account_id))
    for m in cfg.predefined_messages:
        s.merge(PredefinedMessage(id=m.id, title=m.title, body=m.body, queue_id=m.queue, profile_id=m.profile))
    for c in cfg.wrap_up_codes:
        s.merge(WrapUpCode(id=c.id, display_name=c.display_name, queue_id=c.queue))
    for key in SETTING_KEYS:
        # A setting the file does not name keeps what AdminService stored; defaults fill a new database.
        if key in cfg.settings_given or s.get(Setting, key) is None:
            s.merge(Setting(key=key, value=repr(float(getattr(cfg.settings, key)))))
    if s.get(Setting, "token_secret") is None:
        s.add(Setting(key="token_secret", value=secrets.token_hex(32)))
    if s.get(Setting, "cluster_id") is None:
        # Names this database's cluster on NATS: nodes of other databases (or test schemas) never cross-talk.
        s.add(Setting(key="cluster_id", value=secrets.token_hex(8)))


def load_settings(s: Session) -> tuple[Settings, bytes]:
    values = {row.key: row.value for row in s.exec(select(Setting)).all()}
    settings = Settings(**{k: float(values[k]) for k in SETTING_KEYS if k in values})
    return settings, bytes.fromhex(values["token_secret"])


def cluster_id(s: Session) -> str:
    row = s.get(Setting, "cluster_id")
    return row.value if row is not None else "default"


def create_admin_session(tx: Tx, admin_id: str, token: str) -> None:
    if must_get(tx.session, Admin, admin_id).disabled:
        raise denied("ACCOUNT_DISABLED", "This account is disabled.")
    row = AdminSession(token_hash=token_hash(token), admin_id=admin_id, created_at=tx.now, last_used_at=tx.now)
    tx.session.add(row)
    tx.log("admin.login", admin_id=admin_id)


@dataclass(frozen=True, slots=True)
class FoundAdmin:
    principal: AdminPrincipal
    token_hash: str
    stale: bool  # last_used_at needs a touch


def find_admin(s: Session, token: str, now: datetime, idle: float, lifetime: float) -> FoundAdmin:
    """An admin session ends after `idle` seconds without a call and `lifetime` seconds in any case;
    the caller deletes an expired one (end_admin_session)."""
    key = token_hash(token) if token else ""
    row = s.get(AdminSession, key) if key else None
    if row is None:
        raise unauthenticated(
            "ADMIN_SESSION_INVALID", "Log in as an admin first: the admin token is missing or unknown."
        )
    used = row.last_used_at or row.created_at
    if now - row.created_at > timedelta(seconds=lifetime) or now - used > timedelta(seconds=idle):
        raise unauthenticated("ADMIN_SESSION_EXPIRED", "This admin session has expired; log in again.")
    return FoundAdmin(AdminPrincipal(row.admin_id), key, now - used >= timedelta(seconds=60))


def touch_admin_session(tx: Tx, key: str) -> None:
    tx.conn.execute(update(AdminSession).where(col(AdminSession.token_hash) == key).values(last_used_at=tx.now))


def end_admin_sessions(tx: Tx, idle: float, lifetime: float, token: str | None = None) -> int:
    """Delete expired admin sessions (the one of `token`, or all of them: the sweeper)."""
    q = select(AdminSession)
    if token is not None:
        q = q.where(col(AdminSession.token_hash) == token_hash(token))
    gone = 0
    for row in tx.session.exec(q).all():
        used = row.last_used_at or row.created_at
        if tx.now - row.created_at > timedelta(seconds=lifetime) or tx.now - used > timedelta(seconds=idle):
            tx.session.delete(row)
            gone += 1
    return gone


# --- AdminService ------------------------------------------------------------

_ID = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
MAX_NAME = 200
DEFAULT_MAX_CHATS = 3
MAX_MAX_CHATS = 50
MAX_SETTING_SECONDS = 86400.0
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 500


def check_id(value: str, field: str) -> str:
    if not _ID.fullmatch(value):
        raise invalid(
            "BAD_ID",
            f"{field} {value!r} must be 1-64 of a-z, 0-9, _ and -, starting with a letter or digit.",
            field=field,
        )
    return value


def _text(value: str, field: str) -> str:
    value = value.strip()
    if not value:
        raise invalid(f"{field.upper()}_REQUIRED", f"{field} must not be empty.", field=field)
    if len(value) > MAX_NAME:
        raise invalid(f"{field.upper()}_TOO_LONG", f"{field} may have at most {MAX_NAME} characters.", field=field)
    return value


def _exists(s: Session, stmt: SelectOfScalar[Any]) -> bool:
    return s.exec(stmt.limit(1)).first() is not None


def _get(s: Session, model: type[M], id_: str, reason: str, what: str, field: str) -> M:
    row = s.get(model, check_id(id_, field))
    if row is None:
        raise not_found(reason, f"There is no {what} {id_!r}.", **{field: id_})
    return row


def _absent(s: Session, model: type[SQLModel], id_: str, reason: str, what: str, field: str) -> None:
    if s.get(model, check_id(id_, field)) is not None:
        raise already_exists(reason, f"A {what} {id_!r} exists already.", **{field: id_})


def _known(s: Session, model: type[SQLModel], ids: Iterable[str], reason: str, field: str) -> list[str]:
    out = sorted(set(ids))
    for id_ in out:
        if s.get(model, check_id(id_, field)) is None:
            raise invalid(reason, f"There is no {model.__name__.lower()} {id_!r}.", **{field: id_})
    return out


# Queues


def queue_view(q: Queue) -> QueueView:
    return QueueView(q.id, q.display_name, q.wrap_up_required)


def predefined_view(m: PredefinedMessage) -> PredefinedView:
    return PredefinedView(m.id, m.title, m.body, m.queue_id, m.profile_id)


def list_queues(s: Session) -> list[QueueView]:
    return [queue_view(q) for q in s.exec(select(Queue).order_by(Queue.id)).all()]


def create_queue(tx: Tx, queue_id: str, display_name: str, wrap_up_required: bool = False) -> QueueView:
    _absent(tx.session, Queue, queue_id, "QUEUE_EXISTS", "queue", "queue_id")
    q = Queue(id=queue_id, display_name=_text(display_name, "display_name"), wrap_up_required=wrap_up_required)
    tx.session.add(q)
    return queue_view(q)


def update_queue(tx: Tx, queue_id: str, display_name: str, wrap_up_required: bool = False) -> QueueView:
    q = _get(tx.session, Queue, queue_id, "QUEUE_NOT_FOUND", "queue", "queue_id")
    q.display_name = _text(display_name, "display_name")
    q.wrap_up_required = wrap_up_required
    tx.session.add(q)
    return queue_view(q)


def delete_queue(tx: Tx, queue_id: str) -> None:
    s = tx.session
    q = _get(s, Queue, queue_id, "QUEUE_NOT_FOUND", "queue", "queue_id")
    # Conversations keep their queue for the record.
    if _exists(s, select(Conversation.id).where(Conversation.queue_id == queue_id)):
        raise precondition("QUEUE_IN_USE", f"Queue {queue_id!r} has conversations; it cannot be deleted.")
    # What the schema cascades, done explicitly so it holds without FK enforcement.
    s.exec(delete(ProfileQueue).where(col(ProfileQueue.queue_id) == queue_id))
    s.exec(delete(PredefinedMessage).where(col(PredefinedMessage.queue_id) == queue_id))
    s.exec(delete(WrapUpCode).where(col(WrapUpCode.queue_id) == queue_id))
    s.delete(q)


# Profiles


def list_profiles(s: Session) -> list[ProfileView]:
    pq = profile_queues(s)
    rows = s.exec(select(Profile).order_by(Profile.id)).all()
    return [ProfileView(p.id, p.display_name, tuple(sorted(pq.get(p.id, ()))), p.supervisor) for p in rows]


def _set_profile(
    tx: Tx, p: Profile, display_name: str, queue_ids: Iterable[str], supervisor: bool = False
) -> ProfileView:
    s = tx.session
    p.display_name = _text(display_name, "display_name")
    p.supervisor = supervisor
    queues = _known(s, Queue, queue_ids, "UNKNOWN_QUEUE", "queue_id")
    s.add(p)
    s.flush()
    s.exec(delete(ProfileQueue).where(col(ProfileQueue.profile_id) == p.id))
    for qid in queues:
        s.add(ProfileQueue(profile_id=p.id, queue_id=qid))
    s.flush()
    return ProfileView(p.id, p.display_name, tuple(queues), p.supervisor)


def create_profile(
    tx: Tx, profile_id: str, display_name: str, queue_ids: list[str], supervisor: bool = False
) -> ProfileView:
    _absent(tx.session, Profile, profile_id, "PROFILE_EXISTS", "profile", "profile_id")
    return _set_profile(tx, Profile(id=profile_id, display_name=""), display_name, queue_ids, supervisor)


def update_profile(
    tx: Tx, profile_id: str, display_name: str, queue_ids: list[str], supervisor: bool = False
) -> ProfileView:
    """A live session of this profile sees a changed supervisor flag at its next call."""
    p = _get(tx.session, Profile, profile_id, "PROFILE_NOT_FOUND", "profile", "profile_id")
    row = _set_profile(tx, p, display_name, queue_ids, supervisor)
    tx.needs_dispatch()  # agents logged in with it may now serve more queues
    return row


def delete_profile(tx: Tx, profile_id: str) -> None:
    s = tx.session
    p = _get(s, Profile, profile_id, "PROFILE_NOT_FOUND", "profile", "profile_id")
    if _exists(
        s, select(AgentSession.id).where(AgentSession.profile_id == profile_id, col(AgentSession.ended_at).is_(None))
    ):
        raise precondition("PROFILE_IN_USE", f"An agent is logged in with profile {profile_id!r}.")
    _purge_ended_sessions(s, col(AgentSession.profile_id) == profile_id)
    s.exec(delete(AgentProfile).where(col(AgentProfile.profile_id) == profile_id))
    s.exec(delete(ProfileQueue).where(col(ProfileQueue.profile_id) == profile_id))
    s.exec(delete(PredefinedMessage).where(col(PredefinedMessage.profile_id) == profile_id))
    s.delete(p)


def _purge_ended_sessions(s: Session, where: ColumnElement[bool]) -> None:
    """Ended sessions (and their offers and feeds) reference profile and agent without cascade."""
    ids = list(s.exec(select(AgentSession.id).where(where, col(AgentSession.ended_at).is_not(None))).all())
    if ids:
        s.exec(delete(FeedEvent).where(col(FeedEvent.session_id).in_(ids)))
        s.exec(delete(Offer).where(col(Offer.session_id).in_(ids)))
        s.exec(delete(AgentSession).where(col(AgentSession.id).in_(ids)))


# Agents


def _agent_row(s: Session, a: Agent) -> AgentAccountView:
    profiles = s.exec(select(AgentProfile.profile_id).where(AgentProfile.agent_id == a.id)).all()
    return AgentAccountView(a.id, a.display_name, a.max_chats, tuple(sorted(profiles)))


def list_agents(s: Session) -> list[AgentAccountView]:
    return [_agent_row(s, a) for a in s.exec(select(Agent).order_by(Agent.id)).all()]


def _max_chats(n: int) -> int:
    if n < 0 or n > MAX_MAX_CHATS:
        raise invalid("BAD_MAX_CHATS", f"max_chats must be 0 (default {DEFAULT_MAX_CHATS}) to {MAX_MAX_CHATS}.")
    return n or DEFAULT_MAX_CHATS


def _set_agent(
    tx: Tx, a: Agent, display_name: str, max_chats: int, profile_ids: Iterable[str], password_hash: str | None
) -> AgentAccountView:
    s = tx.session
    a.display_name = _text(display_name, "display_name")
    a.max_chats = _max_chats(max_chats)
    profiles = _known(s, Profile, profile_ids, "UNKNOWN_PROFILE", "profile_id")
    if password_hash:
        a.password_hash = password_hash
    s.add(a)
    s.flush()
    s.exec(delete(AgentProfile).where(col(AgentProfile.agent_id) == a.id))
    for pid in profiles:
        s.add(AgentProfile(agent_id=a.id, profile_id=pid))
    s.flush()
    return AgentAccountView(a.id, a.display_name, a.max_chats, tuple(profiles))


def create_agent(
    tx: Tx, agent_id: str, display_name: str, max_chats: int, profile_ids: list[str], password_hash: str
) -> AgentAccountView:
    """The caller hashes the password, off the writer thread: argon2 is slow."""
    _absent(tx.session, Agent, agent_id, "AGENT_EXISTS", "agent", "agent_id")
    if not password_hash:
        raise invalid("PASSWORD_REQUIRED", "A new agent needs a password.")
    return _set_agent(
        tx, Agent(id=agent_id, display_name="", password_hash=""), display_name, max_chats, profile_ids, password_hash
    )


def update_agent(
    tx: Tx,
    agent_id: str,
    display_name: str,
    max_chats: int,
    profile_ids: list[str],
    password_hash: str | None,
) -> AgentAccountView:
    """A live session keeps its profile until logout, even if the agent loses it here;
    a new password ends the agent's sessions (whoever knew the old one is out)."""
    a = _get(tx.session, Agent, agent_id, "AGENT_NOT_FOUND", "agent", "agent_id")
    row = _set_agent(tx, a, display_name, max_chats, profile_ids, password_hash)
    if password_hash:
        agents.end_sessions(tx, agent_id)
    tx.needs_dispatch()  # max_chats may have grown
    return row


def delete_agent(tx: Tx, agent_id: str) -> None:
    s = tx.session
    a = _get(s, Agent, agent_id, "AGENT_NOT_FOUND", "agent", "agent_id")
    # Conversation history (participants, invites) names the agent: keep the account.
    if (
        _exists(s, select(Participant.id).where(Participant.agent_id == agent_id))
        or _exists(s, select(Invite.id).where(or_(Invite.inviter_id == agent_id, Invite.invitee_id == agent_id)))
        or _exists(
            s, select(AgentSession.id).where(AgentSession.agent_id == agent_id, col(AgentSession.ended_at).is_(None))
        )
    ):
        raise precondition(
            "AGENT_IN_USE", f"Agent {agent_id!r} is logged in or has taken part in conversations.", agent_id=agent_id
        )
    _purge_ended_sessions(s, col(AgentSession.agent_id) == agent_id)
    s.exec(delete(AgentProfile).where(col(AgentProfile.agent_id) == agent_id))
    s.delete(a)


# Predefined messages

_PM = ("predefined message", "predefined_message_id")


def list_predefined(s: Session) -> list[PredefinedView]:
    return [predefined_view(m) for m in s.exec(select(PredefinedMessage).order_by(PredefinedMessage.id)).all()]


def _set_predefined(
    tx: Tx, m: PredefinedMessage, title: str, body: str, queue_id: str, profile_id: str
) -> PredefinedView:
    s = tx.session
    m.title = _text(title, "title")
    if not body.strip():
        raise invalid("BODY_REQUIRED", "body must not be empty.", field="body")
    if len(body) > tx.limits.max_message_chars:
        raise invalid("BODY_TOO_LONG", f"body may have at most {tx.limits.max_message_chars} characters.")
    if queue_id and profile_id:
        raise invalid("QUEUE_AND_PROFILE", "A predefined message is for one queue, one profile or everyone, not both.")
    m.body = body
    m.queue_id = _known(s, Queue, [queue_id], "UNKNOWN_QUEUE", "queue_id")[0] if queue_id else None
    m.profile_id = _known(s, Profile, [profile_id], "UNKNOWN_PROFILE", "profile_id")[0] if profile_id else None
    s.add(m)
    return predefined_view(m)


def create_predefined(
    tx: Tx, message_id: str, title: str, body: str, queue_id: str, profile_id: str
) -> PredefinedView:
    message_id = message_id or uuid.uuid4().hex
    _absent(tx.session, PredefinedMessage, message_id, "PREDEFINED_MESSAGE_EXISTS", *_PM)
    return _set_predefined(
        tx, PredefinedMessage(id=message_id, title="", body=""), title, body, queue_id, profile_id
    )


def update_predefined(
    tx: Tx, message_id: str, title: str, body: str, queue_id: str, profile_id: str
) -> PredefinedView:
    m = _get(tx.session, PredefinedMessage, message_id, "PREDEFINED_MESSAGE_NOT_FOUND", *_PM)
    return _set_predefined(tx, m, title, body, queue_id, profile_id)


def delete_predefined(tx: Tx, message_id: str) -> None:
    m = _get(tx.session, PredefinedMessage, message_id, "PREDEFINED_MESSAGE_NOT_FOUND", *_PM)
    tx.session.delete(m)


# Wrap-up codes

_WRAP = ("wrap-up code", "wrap_up_code_id")


def wrap_up_code_view(c: WrapUpCode) -> WrapUpCodeView:
    return WrapUpCodeView(c.id, c.display_name, c.queue_id)


def list_wrap_up_codes(s: Session) -> list[WrapUpCodeView]:
    return [wrap_up_code_view(c) for c in s.exec(select(WrapUpCode).order_by(WrapUpCode.id)).all()]


def _set_wrap_up_code(tx: Tx, c: WrapUpCode, display_name: str, queue_id: str) -> WrapUpCodeView:
    c.display_name = _text(display_name, "display_name")
    c.queue_id = _known(tx.session, Queue, [queue_id], "UNKNOWN_QUEUE", "queue_id")[0] if queue_id else None
    tx.session.add(c)
    return wrap_up_code_view(c)


def create_wrap_up_code(tx: Tx, code_id: str, display_name: str, queue_id: str) -> WrapUpCodeView:
    _absent(tx.session, WrapUpCode, code_id, "WRAP_UP_CODE_EXISTS", *_WRAP)
    return _set_wrap_up_code(tx, WrapUpCode(id=code_id, display_name=""), display_name, queue_id)


def update_wrap_up_code(tx: Tx, code_id: str, display_name: str, queue_id: str) -> WrapUpCodeView:
    c = _get(tx.session, WrapUpCode, code_id, "WRAP_UP_CODE_NOT_FOUND", *_WRAP)
    return _set_wrap_up_code(tx, c, display_name, queue_id)


def delete_wrap_up_code(tx: Tx, code_id: str) -> None:
    """Conversations closed with it keep its id and name."""
    c = _get(tx.session, WrapUpCode, code_id, "WRAP_UP_CODE_NOT_FOUND", *_WRAP)
    tx.session.delete(c)


# Settings


def update_settings(tx: Tx, new: Settings) -> Settings:
    for key in SETTING_KEYS:
        value = getattr(new, key)
        if not 0 < value <= MAX_SETTING_SECONDS:
            raise invalid("BAD_SETTING", f"{key} must be more than 0 and at most one day.", setting=key)
    for key in SETTING_KEYS:
        tx.session.merge(Setting(key=key, value=repr(float(getattr(new, key)))))
    # Only once committed: offers made from then on use the new values.
    tx.settings_changed(new)
    return new


# Conversations


def _page_token(conv: Conversation) -> str:
    raw = json.dumps([conv.created_at.isoformat(), conv.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _after_token(token: str) -> tuple[datetime, str]:
    try:
        created, conv_id = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        when = datetime.fromisoformat(created)
        if when.tzinfo is None:  # the column refuses naive times
            raise ValueError(created)
        return when, str(conv_id)
    except (ValueError, TypeError):  # bad base64, JSON, shape or date
        raise invalid("BAD_PAGE_TOKEN", "page_token is not one this server returned.") from None


def list_conversations(
    s: Session,
    page_size: int,
    page_token: str,
    queue_id: str = "",
    wrap_up_code_id: str = "",
    rating_score: int = 0,
) -> tuple[list[ConversationView], str]:
    """Newest first. The token holds the last row's (created_at, id): pages stay stable as chats start.
    Filters left empty (0) do not filter; a filter naming nothing gives an empty list, not an error
    (a deleted wrap-up code still finds the conversations closed with it)."""
    if page_size < 0:
        raise invalid("BAD_PAGE_SIZE", "page_size must not be negative.")
    if not 0 <= rating_score <= 5:
        raise invalid("BAD_SCORE", "rating_score must be 1 to 5, or 0 for any.")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    q = select(Conversation).order_by(col(Conversation.created_at).desc(), col(Conversation.id).desc())
    if queue_id:
        q = q.where(Conversation.queue_id == queue_id)
    if wrap_up_code_id:
        q = q.where(Conversation.wrap_up_code_id == wrap_up_code_id)
    if rating_score:
        q = q.where(Conversation.rating_score == rating_score)
    if page_token:
        created, conv_id = _after_token(page_token)
        q = q.where(
            or_(Conversation.created_at < created, and_(Conversation.created_at == created, Conversation.id < conv_id))
        )
    rows = list(s.exec(q.limit(size + 1)).all())
    more = len(rows) > size
    rows = rows[:size]
    return [conversation_view(s, c) for c in rows], _page_token(rows[-1]) if more else ""
