"""Identity tokens: what a hosting site signs to tell queuechat who its signed-in customer is.

`--demo-identity` plays that site with the secret the server's own configuration file holds
(`[security] identity_secrets`, else the first `[[security.identity_tokens]]`): its claims (name,
e-mail) become authenticated variables, which the agent sees with a lock.
"""

from __future__ import annotations

import os
import time
import tomllib
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

# How long a token lives: StartChat checks it once, and servers refuse tokens that claim to live
# longer than identity_max_lifetime (default 3600 s).
TTL = 300
DEMO_NAME = "Ada Lovelace"
DEMO_EMAIL = "ada@example.com"


class IdentityError(Exception):
    """No secret to sign with: a missing or unreadable file, or no secret in it."""


@dataclass(frozen=True)
class Signer:
    secret: str
    audience: str | None = None
    issuer: str | None = None


def default_config() -> Path:
    """$QUEUECHAT_CONFIG (as scripts/serve reads it), else config/demo.toml here, else the repository's."""
    if os.environ.get("QUEUECHAT_CONFIG"):
        return Path(os.environ["QUEUECHAT_CONFIG"])
    here = Path("config/demo.toml")
    if here.is_file():
        return here
    repo = Path(__file__).resolve().parents[2] / "config" / "demo.toml"
    return repo if repo.is_file() else here


def signer_from_config(path: Path) -> Signer:
    try:
        with path.open("rb") as f:
            doc = tomllib.load(f)
    except OSError as e:
        raise IdentityError(
            f"cannot read {path}: {e.strerror or e} (give --config FILE, or --identity-secret)"
        ) from None
    except tomllib.TOMLDecodeError as e:
        raise IdentityError(f"{path} is not valid TOML: {e}") from None
    security: Any = doc.get("security", {})
    secrets: Any = security.get("identity_secrets", []) if isinstance(security, dict) else []
    if isinstance(secrets, list) and secrets and isinstance(secrets[0], str):
        return Signer(secrets[0])
    tokens: Any = security.get("identity_tokens", []) if isinstance(security, dict) else []
    if isinstance(tokens, list) and tokens and isinstance(tokens[0], dict) and isinstance(tokens[0].get("secret"), str):
        t: dict[str, Any] = tokens[0]
        return Signer(t["secret"], t.get("audience"), t.get("issuer"))
    raise IdentityError(f"{path} has no [security] identity_secrets: give --identity-secret")


def sign(signer: Signer, claims: dict[str, str], ttl: int = TTL, now: float | None = None) -> str:
    """An HS256 JWT with claims, iat, exp and a fresh jti (the server refuses a token used twice)."""
    issued = int(time.time() if now is None else now)
    payload: dict[str, Any] = {**claims, "iat": issued, "exp": issued + ttl, "jti": uuid.uuid4().hex}
    if signer.audience:
        payload["aud"] = signer.audience
    if signer.issuer:
        payload["iss"] = signer.issuer
    return jwt.encode(payload, signer.secret, algorithm="HS256")
