"""The supervisor's configuration file (TOML), read at start-up.

It is applied on every start as an upsert: the queues, profiles, agents,
admins, predefined messages and settings it names are set to its values;
anything created through AdminService and not named here is left alone.

The file is validated with pydantic (strict types, unknown keys refused), then
for what types cannot say: duplicate ids, references, passwords. Environment
variables QUEUECHAT_<SECTION>__<KEY> override [settings], [limits] and
[security] keys and go through the same models. docs/configuration.md has the
keys and their defaults.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

from pydantic import ConfigDict, Field, Strict, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass
from pydantic_core import ErrorDetails

# Strict per field rather than per model: a strict model would also refuse a
# TOML table (a dict) where a nested model belongs. Strict float still takes an int.
_Str = Annotated[str, Strict()]
_Id = Annotated[str, Strict(), Field(min_length=1)]
_Text = Annotated[str, Strict(), Field(min_length=1)]
_IdList = Annotated[list[_Id], Strict()]
_Float = Annotated[float, Strict()]
_Count = Annotated[int, Strict(), Field(ge=1)]
_CountOrNone = Annotated[int, Strict(), Field(ge=0)]  # 0 allowed: none at all
_Interval = Annotated[float, Strict(), Field(gt=0, allow_inf_nan=False)]
# The range AdminService.UpdateSettings accepts, so a value from the file can be sent back unchanged.
_Seconds = Annotated[float, Strict(), Field(gt=0, le=86400, allow_inf_nan=False)]

_MODEL = ConfigDict(extra="forbid")


@dataclass(frozen=True, config=_MODEL)
class Settings:
    # No range here: AdminService builds these from requests and refuses bad values with INVALID_ARGUMENT itself.
    offer_timeout: _Float = 30.0
    reject_cooldown: _Float = 30.0
    stream_grace: _Float = 10.0
    # How long after the chat ended the customer may rate it.
    rating_window: _Float = 3600.0


@dataclass(frozen=True, config=_MODEL)
class _FileSettings(Settings):
    offer_timeout: _Seconds = Settings.offer_timeout
    reject_cooldown: _Seconds = Settings.reject_cooldown
    stream_grace: _Seconds = Settings.stream_grace
    rating_window: _Seconds = Settings.rating_window


@dataclass(frozen=True, config=_MODEL)
class Limits:
    max_message_chars: _Count = 4000
    max_variables: _CountOrNone = 50
    max_variable_chars: _Count = 1000
    heartbeat_interval: _Interval = 15.0
    subscriber_queue: _Count = 1000
    # Attachments: 20 MiB = 20,971,520 bytes per file, 5 per message, 1 MiB chunks.
    max_attachment_bytes: _Count = 20 * 1024 * 1024
    max_attachments_per_message: _CountOrNone = 5
    upload_chunk_bytes: _Count = 1024 * 1024
    # Unfinished or unsent uploads are removed after this many seconds without progress.
    upload_ttl: _Interval = 3600.0
    upload_sweep_interval: _Interval = 60.0
    # Supervisor figures: the share of chats answered within this many seconds is the service level.
    service_level_target: _Interval = 60.0


_Bytes = Annotated[int, Strict(), Field(ge=0)]
_Cap = Annotated[int, Strict(), Field(ge=0)]  # 0: this limit is off
_NonNegative = Annotated[float, Strict(), Field(ge=0, allow_inf_nan=False)]


@dataclass(frozen=True, config=_MODEL)
class RateLimits:
    """Defences against floods (docs/api.md, "Rate limits"). Each count is per minute unless it says
    bytes (per hour); 0 turns that one limit off, enabled = false turns them all off."""

    enabled: Annotated[bool, Strict()] = True
    # Peers whose X-Forwarded-For is believed (the built-in web bridge connects from loopback).
    trusted_proxies: Annotated[list[_Text], Strict()] = dataclasses.field(default_factory=lambda: ["127.0.0.1", "::1"])
    start_chat_per_address: _Cap = 20
    start_chat_per_identity: _Cap = 10
    messages_per_conversation: _Cap = 120
    uploads_per_conversation: _Cap = 20
    uploads_per_address: _Cap = 60
    upload_bytes_per_conversation: _Bytes = 200 * 1024 * 1024
    upload_bytes_per_address: _Bytes = 1024 * 1024 * 1024
    login_per_address: _Cap = 30
    login_per_username: _Cap = 30
    # After this many wrong passwords in a row for one username from one address, wait base * 2^n seconds.
    login_free_failures: _Cap = 3
    login_backoff_base: _NonNegative = 1.0
    login_backoff_max: _Interval = 300.0
    # Chats waiting in one queue; past it StartChat answers QUEUE_FULL.
    max_waiting_per_queue: _Cap = 1000
    # MarkRead calls per reader in a conversation, and RateConversation calls per conversation.
    read_marks_per_conversation: _Cap = 120
    ratings_per_conversation: _Cap = 10


@dataclass(frozen=True, config=_MODEL)
class Cluster:
    """How the nodes of a cluster (PostgreSQL + NATS) keep in step; unused by the embedded single process."""

    # An offer stream's lease: renewed every third of this; a dead node's streams stop counting after it.
    lease_seconds: _Interval = 10.0
    # The database sweep that fires due offer time-outs and grace periods whoever armed them.
    sweep_interval: _Interval = 1.0
    # How often each open stream's cursor is compared with the database (and on every NATS reconnect).
    reconcile_interval: _Interval = 2.0


@dataclass(frozen=True, config=_MODEL)
class QueueConfig:
    id: _Id
    display_name: _Text
    # CloseConversation needs a wrap-up code in this queue.
    wrap_up_required: Annotated[bool, Strict()] = False


@dataclass(frozen=True, config=_MODEL)
class ProfileConfig:
    id: _Id
    display_name: _Text
    queues: _IdList
    # Agents logged in with it supervise its queues: monitor, whisper, barge in.
    supervisor: Annotated[bool, Strict()] = False


@dataclass(frozen=True, config=_MODEL)
class AgentConfig:
    id: _Id
    display_name: _Text
    profiles: _IdList
    password: _Str | None = None
    password_hash: _Str | None = None
    max_chats: _Count = 3
    # A disabled agent cannot log in; its sessions end when the file is applied.
    disabled: Annotated[bool, Strict()] = False


@dataclass(frozen=True, config=_MODEL)
class AdminConfig:
    id: _Id
    password: _Str | None = None
    password_hash: _Str | None = None
    disabled: Annotated[bool, Strict()] = False


@dataclass(frozen=True, config=_MODEL)
class IdentityTokenConfig:
    """One signer of customers' identity tokens. audience and issuer are checked when given."""

    secret: _Text
    audience: _Text | None = None
    issuer: _Text | None = None


@dataclass(frozen=True, config=_MODEL)
class PredefinedConfig:
    id: _Id
    title: _Text
    body: _Text
    queue: _Id | None = None
    profile: _Id | None = None


@dataclass(frozen=True, config=_MODEL)
class WrapUpCodeConfig:
    id: _Id
    display_name: _Text
    # Only for this queue; left out: for every queue.
    queue: _Id | None = None


@dataclass(frozen=True, config=_MODEL)
class Security:
    # HS256 secrets for customers' identity tokens; several allow rotation.
    identity_secrets: Annotated[list[_Text], Strict()] = dataclasses.field(default_factory=list)
    # The same with an expected audience and issuer per signer: [[security.identity_tokens]].
    identity_tokens: Annotated[list[IdentityTokenConfig], Strict()] = dataclasses.field(default_factory=list)
    # Clock skew allowed on exp, nbf and iat; the longest lifetime (exp - iat) a token may claim.
    identity_leeway: _NonNegative = 30.0
    identity_max_lifetime: _Interval = 3600.0
    # argon2id cost; lower it only for tests. argon2 needs 8 KiB per lane and PasswordHasher uses 4 lanes.
    argon2_time_cost: _Count = 3
    argon2_memory_kib: Annotated[int, Strict(), Field(ge=32)] = 65536
    # Sessions end after this long without a call (an agent's not while its offer stream is open),
    # and after the absolute lifetime in any case.
    admin_session_idle: _Interval = 3600.0
    admin_session_max: _Interval = 12 * 3600.0
    agent_session_idle: _Interval = 2 * 3600.0
    agent_session_max: _Interval = 24 * 3600.0


@dataclass(frozen=True, config=_MODEL)
class _File:
    """The file as written: one field per top-level key."""

    settings: _FileSettings = dataclasses.field(default_factory=_FileSettings)
    limits: Limits = dataclasses.field(default_factory=Limits)
    security: Security = dataclasses.field(default_factory=Security)
    rate_limits: RateLimits = dataclasses.field(default_factory=RateLimits)
    cluster: Cluster = dataclasses.field(default_factory=Cluster)
    queues: Annotated[list[QueueConfig], Strict()] = dataclasses.field(default_factory=list)
    profiles: Annotated[list[ProfileConfig], Strict()] = dataclasses.field(default_factory=list)
    agents: Annotated[list[AgentConfig], Strict()] = dataclasses.field(default_factory=list)
    admins: Annotated[list[AdminConfig], Strict()] = dataclasses.field(default_factory=list)
    predefined_messages: Annotated[list[PredefinedConfig], Strict()] = dataclasses.field(default_factory=list)
    wrap_up_codes: Annotated[list[WrapUpCodeConfig], Strict()] = dataclasses.field(default_factory=list)


@dataclass(frozen=True, config=_MODEL)
class Config:
    settings: Settings = dataclasses.field(default_factory=Settings)
    # The settings the file or the environment names; only these override values changed through AdminService.
    settings_given: frozenset[str] = frozenset()
    limits: Limits = dataclasses.field(default_factory=Limits)
    queues: list[QueueConfig] = dataclasses.field(default_factory=list)
    profiles: list[ProfileConfig] = dataclasses.field(default_factory=list)
    agents: list[AgentConfig] = dataclasses.field(default_factory=list)
    admins: list[AdminConfig] = dataclasses.field(default_factory=list)
    predefined_messages: list[PredefinedConfig] = dataclasses.field(default_factory=list)
    wrap_up_codes: list[WrapUpCodeConfig] = dataclasses.field(default_factory=list)
    identity_secrets: list[str] = dataclasses.field(default_factory=list)
    argon2_time_cost: int = 3
    argon2_memory_kib: int = 65536
    rate_limits: RateLimits = dataclasses.field(default_factory=RateLimits)
    security: Security = dataclasses.field(default_factory=lambda: Security())
    cluster: Cluster = dataclasses.field(default_factory=Cluster)

    @property
    def identity_signers(self) -> list[IdentityTokenConfig]:
        """Every accepted signer: identity_secrets (any audience) and identity_tokens."""
        return [IdentityTokenConfig(s) for s in self.identity_secrets] + list(self.security.identity_tokens)


class ConfigError(ValueError):
    """An invalid configuration; `problems` has one line per problem, each naming where and what was expected."""

    def __init__(self, problems: str | Iterable[str]):
        self.problems = (problems,) if isinstance(problems, str) else tuple(problems)
        super().__init__("\n".join(self.problems))


_FILE = TypeAdapter(_File)
ENV_PREFIX = "QUEUECHAT_"
# Only the flat sections: the lists of queues, agents... have no sensible one-variable form.
ENV_SECTIONS = {
    "settings": _FileSettings,
    "limits": Limits,
    "security": Security,
    "rate_limits": RateLimits,
    "cluster": Cluster,
}
_SECTIONS = {
    **ENV_SECTIONS,
    "queues": QueueConfig,
    "profiles": ProfileConfig,
    "agents": AgentConfig,
    "admins": AdminConfig,
    "predefined_messages": PredefinedConfig,
    "wrap_up_codes": WrapUpCodeConfig,
}
# Their values are not repeated in error messages, which end up in logs.
_SECRET_KEYS = {"password", "password_hash", "identity_secrets", "secret"}

Loc = tuple[str | int, ...]


def parse_config(doc: dict[str, Any], environ: Mapping[str, str] | None = None) -> Config:
    """Validate a parsed TOML document; QUEUECHAT_<SECTION>__<KEY> variables in `environ` override it.

    `environ` is not os.environ unless passed, so that building a config in a test does not depend on the shell.
    """
    return _parse(doc, environ or {}, None)


def load_config(path: str | Path, environ: Mapping[str, str] = os.environ) -> Config:
    """Read and validate the file at `path`, with the process environment's overrides unless told otherwise."""
    with open(path, "rb") as f:
        try:
            doc = tomllib.load(f)
        except tomllib.TOMLDecodeError as e:
            raise ConfigError([f"{path}: not valid TOML: {e}"]) from None
    return _parse(doc, environ, str(path))


def _parse(doc: Any, environ: Mapping[str, str], file: str | None) -> Config:
    doc, from_env, problems = _with_environment(doc, environ)
    try:
        f = _FILE.validate_python(doc)
    except ValidationError as e:
        raise ConfigError(problems + [_describe(err, file, from_env) for err in e.errors(include_url=False)]) from None
    problems += [_line(loc, what, file, from_env) for loc, what in [*_check(f), *_check_wrap_up_codes(f)]]
    if problems:
        raise ConfigError(problems)
    # The merged document: a setting from the environment counts as given too.
    given = frozenset(doc.get("settings", {}))
    return Config(
        settings=Settings(**dataclasses.asdict(f.settings)),
        settings_given=given,
        limits=f.limits,
        queues=f.queues,
        profiles=f.profiles,
        agents=f.agents,
        admins=f.admins,
        predefined_messages=f.predefined_messages,
        wrap_up_codes=f.wrap_up_codes,
        identity_secrets=f.security.identity_secrets,
        argon2_time_cost=f.security.argon2_time_cost,
        argon2_memory_kib=f.security.argon2_memory_kib,
        rate_limits=f.rate_limits,
        security=f.security,
        cluster=f.cluster,
    )


def _env_value(text: str) -> Any:
    """A variable's value read as a TOML value (12, 0.5, ["a", "b"], "text"); anything else stays a string."""
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    # A value with a newline could smuggle in more keys; such a value is just a (wrong) string.
    return parsed["v"] if parsed.keys() == {"v"} else text


def _with_environment(doc: Any, environ: Mapping[str, str]) -> tuple[Any, dict[tuple[str, str], str], list[str]]:
    """The document with the environment's overrides (a copy: the caller's is left alone), where they came from."""
    from_env: dict[tuple[str, str], str] = {}
    problems: list[str] = []
    if not isinstance(doc, dict):
        return doc, from_env, problems  # the model says what was expected
    doc = dict(doc)
    for name in sorted(environ):
        # QUEUECHAT_CONFIG, QUEUECHAT_LISTEN... belong to the command line, not to the file.
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        section, _, key = name[len(ENV_PREFIX) :].lower().partition("__")
        if section not in ENV_SECTIONS:
            problems.append(
                f"environment variable {name}: unknown section {section!r}; "
                f"expected one of {', '.join(ENV_PREFIX + s.upper() + '__' for s in ENV_SECTIONS)}"
            )
            continue
        table = doc.get(section, {})
        if not isinstance(table, dict):
            continue  # the file's own error is reported
        doc[section] = {**table, key: _env_value(environ[name])}
        from_env[(section, key)] = name
    return doc, from_env, problems


def _check(f: _File) -> Iterable[tuple[Loc, str]]:
    """What the types cannot say: unique ids, references within the file, a way to log in."""
    for name in ("queues", "profiles", "agents", "admins", "predefined_messages", "wrap_up_codes"):
        first: dict[str, int] = {}
        for i, item in enumerate(getattr(f, name)):
            j = first.setdefault(item.id, i)
            if j != i:
                yield (name, i, "id"), f"duplicate id {item.id!r} (also {name}[{j}]); expected each id once"
    queues = [q.id for q in f.queues]
    profiles = [p.id for p in f.profiles]

    def unknown(kind: str, value: str, known: list[str]) -> str:
        return f"unknown {kind} {value!r}; expected one of the file's {kind}s: {', '.join(known) or '(none)'}"

    for i, p in enumerate(f.profiles):
        for k, q in enumerate(p.queues):
            if q not in queues:
                yield ("profiles", i, "queues", k), unknown("queue", q, queues)
    for i, a in enumerate(f.agents):
        for k, pid in enumerate(a.profiles):
            if pid not in profiles:
                yield ("agents", i, "profiles", k), unknown("profile", pid, profiles)
    people: list[tuple[str, Sequence[AgentConfig | AdminConfig]]] = [("agents", f.agents), ("admins", f.admins)]
    for name, accounts in people:
        for i, account in enumerate(accounts):
            if not (account.password or account.password_hash):
                yield (name, i), f"{account.id!r} cannot log in; expected password or password_hash"
    for i, m in enumerate(f.predefined_messages):
        if m.queue is not None and m.profile is not None:
            yield ("predefined_messages", i), "both queue and profile; expected at most one (neither: for everyone)"
        if m.queue is not None and m.queue not in queues:
            yield ("predefined_messages", i, "queue"), unknown("queue", m.queue, queues)
        if m.profile is not None and m.profile not in profiles:
            yield ("predefined_messages", i, "profile"), unknown("profile", m.profile, profiles)
        if len(m.body) > f.limits.max_message_chars:
            yield (
                ("predefined_messages", i, "body"),
                f"{len(m.body)} characters; expected at most {f.limits.max_message_chars} ([limits] max_message_chars)",
            )


def _check_wrap_up_codes(f: _File) -> Iterable[tuple[Loc, str]]:
    queues = [q.id for q in f.queues]
    for i, c in enumerate(f.wrap_up_codes):
        if c.queue is not None and c.queue not in queues:
            yield ("wrap_up_codes", i, "queue"), (
                f"unknown queue {c.queue!r}; expected one of the file's queues: {', '.join(queues) or '(none)'}"
            )


def _key(loc: Loc) -> str:
    """A location in TOML terms: `[limits] max_message_chars`, `agents[2].profiles` (items count from 0)."""
    if not loc:
        return "the document"
    head, *rest = loc
    path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in rest)
    if head in ENV_SECTIONS:
        return f"[{head}]" + (f" {path.removeprefix('.')}" if path else "")
    return f"{head}{path}"


def _line(loc: Loc, what: str, file: str | None, from_env: dict[tuple[str, str], str]) -> str:
    name = from_env.get((str(loc[0]), str(loc[1]))) if len(loc) >= 2 else None
    if name:
        return f"environment variable {name} ({_key(loc)}): {what}"
    return f"{file}: {_key(loc)}: {what}" if file else f"{_key(loc)}: {what}"


# bool before int: a bool is an int to isinstance.
_TOML_TYPES: tuple[tuple[type, str], ...] = (
    (bool, "a boolean"),
    (int, "an integer"),
    (float, "a number"),
    (str, "a string"),
    (list, "an array"),
    (dict, "a table"),
)
_NO_INPUT = {"extra_forbidden", "unexpected_keyword_argument", "missing", "missing_argument"}


def _got(value: Any, secret: bool) -> str:
    kind = next((name for t, name in _TOML_TYPES if isinstance(value, t)), "a date or time")
    if secret or isinstance(value, list | dict):
        return f"got {kind}"
    shown = repr(value)
    return f"got {kind} {shown[:60] + '...' if len(shown) > 60 else shown}"


def _expected(err: ErrorDetails) -> str:
    loc: Loc = err["loc"]
    kind: str = err["type"]
    ctx: dict[str, Any] = err.get("ctx", {})
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        model = _SECTIONS.get(str(loc[0])) if len(loc) > 1 else _File
        known = ", ".join(f.name for f in dataclasses.fields(model)) if model else ""
        return f"unknown key; expected one of {known}"
    if kind in ("missing", "missing_argument"):
        return "missing; this key is required"
    if kind == "float_type":
        return "expected a number"
    if kind == "int_type":
        return "expected an integer"
    if kind == "string_type":
        return "expected a string"
    if kind == "list_type":
        # The only lists are the top-level arrays of tables and lists of ids or secrets.
        return f"expected an array of tables [[{loc[0]}]]" if len(loc) == 1 else "expected a list of strings"
    if kind in ("dataclass_type", "dict_type", "model_type"):
        if len(loc) == 1:
            return f"expected a table [{loc[0]}]"
        return f"expected a table [[{loc[0]}]]" if len(loc) == 2 else "expected a table"
    if kind == "string_too_short":
        return "expected a non-empty string"
    if kind == "greater_than":
        return f"expected more than {ctx['gt']:g}"
    if kind == "greater_than_equal":
        return f"expected at least {ctx['ge']:g}"
    if kind == "less_than_equal":
        return f"expected at most {ctx['le']:g}"
    if kind == "finite_number":
        return "expected a finite number"
    return str(err["msg"])


def _describe(err: ErrorDetails, file: str | None, from_env: dict[tuple[str, str], str]) -> str:
    loc: Loc = tuple(err["loc"])
    what = _expected(err)
    if err["type"] not in _NO_INPUT:
        what += ", " + _got(err["input"], secret=any(p in _SECRET_KEYS for p in loc))
    return _line(loc, what, file, from_env)
