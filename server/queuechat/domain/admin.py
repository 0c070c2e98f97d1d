"""Supervisor configuration: applying the TOML file, settings, admin sessions."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

from sqlmodel import delete, select

from ..config import Config, Settings
from ..errors import unauthenticated
from ..store import Tx
from ..store.models import (
    Admin,
    AdminSession,
    Agent,
    AgentProfile,
    PredefinedMessage,
    Profile,
    ProfileQueue,
    Queue,
    Setting,
)
from .auth import Passwords, token_hash
from .log import utcnow
from .views import AdminPrincipal

if TYPE_CHECKING:
    from .core import Core

SETTING_KEYS = ("offer_timeout", "reject_cooldown", "stream_grace")


def _hash(passwords: Passwords, current: str | None, password: str | None, given_hash: str | None) -> str:
    if given_hash:
        return given_hash
    assert password is not None
    if current and passwords.verify(current, password):
        return current  # unchanged: keep the salt, skip a costly rehash
    return passwords.hash(password)


def apply_config(tx: Tx, cfg: Config, passwords: Passwords) -> None:
    s = tx.session
    for q in cfg.queues:
        s.merge(Queue(id=q.id, display_name=q.display_name))
    s.flush()
    for p in cfg.profiles:
        s.merge(Profile(id=p.id, display_name=p.display_name))
        s.flush()
        s.exec(delete(ProfileQueue).where(ProfileQueue.profile_id == p.id))
        for qid in p.queues:
            s.add(ProfileQueue(profile_id=p.id, queue_id=qid))
    s.flush()
    for a in cfg.agents:
        cur = s.get(Agent, a.id)
        h = _hash(passwords, cur.password_hash if cur else None, a.password, a.password_hash)
        s.merge(Agent(id=a.id, display_name=a.display_name, password_hash=h, max_chats=a.max_chats))
        s.flush()
        s.exec(delete(AgentProfile).where(AgentProfile.agent_id == a.id))
        for pid in a.profiles:
            s.add(AgentProfile(agent_id=a.id, profile_id=pid))
    for ad in cfg.admins:
        cur_admin = s.get(Admin, ad.id)
        h = _hash(passwords, cur_admin.password_hash if cur_admin else None, ad.password, ad.password_hash)
        s.merge(Admin(id=ad.id, password_hash=h))
    for m in cfg.predefined_messages:
        s.merge(PredefinedMessage(id=m.id, title=m.title, body=m.body, queue_id=m.queue, profile_id=m.profile))
    for key in SETTING_KEYS:
        s.merge(Setting(key=key, value=repr(float(getattr(cfg.settings, key)))))
    if s.get(Setting, "token_secret") is None:
        s.add(Setting(key="token_secret", value=secrets.token_hex(32)))


def load_settings(s) -> tuple[Settings, bytes]:
    values = {row.key: row.value for row in s.exec(select(Setting)).all()}
    settings = Settings(**{k: float(values[k]) for k in SETTING_KEYS if k in values})
    return settings, bytes.fromhex(values["token_secret"])


def create_admin_session(tx: Tx, admin_id: str, token: str) -> None:
    tx.session.add(AdminSession(token_hash=token_hash(token), admin_id=admin_id, created_at=utcnow()))


def find_admin(s, token: str) -> AdminPrincipal:
    row = s.get(AdminSession, token_hash(token)) if token else None
    if row is None:
        raise unauthenticated("ADMIN_SESSION_INVALID", "Log in as an admin first: the admin token is missing or unknown.")
    return AdminPrincipal(row.admin_id)
