"""The supervisor's configuration file (TOML), read at start-up.

It is applied on every start as an upsert: the queues, profiles, agents,
admins, predefined messages and settings it names are set to its values;
anything created through AdminService and not named here is left alone.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Settings:
    offer_timeout: float = 30.0
    reject_cooldown: float = 30.0
    stream_grace: float = 10.0


@dataclass
class Limits:
    max_message_chars: int = 4000
    max_variables: int = 50
    max_variable_chars: int = 1000
    heartbeat_interval: float = 15.0
    subscriber_queue: int = 1000
    # Attachments: 20 MiB = 20,971,520 bytes per file, 5 per message, 1 MiB chunks.
    max_attachment_bytes: int = 20 * 1024 * 1024
    max_attachments_per_message: int = 5
    upload_chunk_bytes: int = 1024 * 1024
    # Unfinished or unsent uploads are removed after this many seconds without progress.
    upload_ttl: float = 3600.0
    upload_sweep_interval: float = 60.0


@dataclass
class QueueConfig:
    id: str
    display_name: str


@dataclass
class ProfileConfig:
    id: str
    display_name: str
    queues: list[str]


@dataclass
class AgentConfig:
    id: str
    display_name: str
    profiles: list[str]
    password: str | None = None
    password_hash: str | None = None
    max_chats: int = 3


@dataclass
class AdminConfig:
    id: str
    password: str | None = None
    password_hash: str | None = None


@dataclass
class PredefinedConfig:
    id: str
    title: str
    body: str
    queue: str | None = None
    profile: str | None = None


@dataclass
class Config:
    settings: Settings = field(default_factory=Settings)
    # The settings the file names; only these override values changed through AdminService.
    settings_given: frozenset[str] = frozenset()
    limits: Limits = field(default_factory=Limits)
    queues: list[QueueConfig] = field(default_factory=list)
    profiles: list[ProfileConfig] = field(default_factory=list)
    agents: list[AgentConfig] = field(default_factory=list)
    admins: list[AdminConfig] = field(default_factory=list)
    predefined_messages: list[PredefinedConfig] = field(default_factory=list)
    # HS256 secrets for customers' identity tokens; several allow rotation.
    identity_secrets: list[str] = field(default_factory=list)
    # argon2id cost; lower it only for tests.
    argon2_time_cost: int = 3
    argon2_memory_kib: int = 65536


class ConfigError(ValueError):
    pass


def _pick(cls: type, data: dict[str, Any], where: str, rename: dict[str, str] | None = None) -> Any:
    rename = rename or {}
    data = {rename.get(k, k): v for k, v in data.items()}
    allowed = set(cls.__dataclass_fields__)
    unknown = set(data) - allowed
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    try:
        return cls(**data)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def parse_config(doc: dict[str, Any]) -> Config:
    cfg = Config()
    known = {"settings", "limits", "security", "queues", "profiles", "agents", "admins", "predefined_messages"}
    unknown = set(doc) - known
    if unknown:
        raise ConfigError(f"unknown section(s) {', '.join(sorted(unknown))}")
    if "settings" in doc:
        cfg.settings = _pick(Settings, doc["settings"], "[settings]")
        cfg.settings_given = frozenset(doc["settings"])
    if "limits" in doc:
        cfg.limits = _pick(Limits, doc["limits"], "[limits]")
    sec = dict(doc.get("security", {}))
    cfg.identity_secrets = list(sec.pop("identity_secrets", []))
    cfg.argon2_time_cost = int(sec.pop("argon2_time_cost", cfg.argon2_time_cost))
    cfg.argon2_memory_kib = int(sec.pop("argon2_memory_kib", cfg.argon2_memory_kib))
    if sec:
        raise ConfigError(f"[security]: unknown key(s) {', '.join(sorted(sec))}")
    cfg.queues = [_pick(QueueConfig, q, f"queues[{i}]") for i, q in enumerate(doc.get("queues", []))]
    cfg.profiles = [_pick(ProfileConfig, p, f"profiles[{i}]") for i, p in enumerate(doc.get("profiles", []))]
    cfg.agents = [_pick(AgentConfig, a, f"agents[{i}]") for i, a in enumerate(doc.get("agents", []))]
    cfg.admins = [_pick(AdminConfig, a, f"admins[{i}]") for i, a in enumerate(doc.get("admins", []))]
    cfg.predefined_messages = [
        _pick(PredefinedConfig, m, f"predefined_messages[{i}]") for i, m in enumerate(doc.get("predefined_messages", []))
    ]
    for a in cfg.agents + cfg.admins:  # type: ignore[operator]
        if not (a.password or a.password_hash):
            raise ConfigError(f"{a.id}: needs password or password_hash")
    return cfg


def load_config(path: str | Path) -> Config:
    with open(path, "rb") as f:
        return parse_config(tomllib.load(f))
