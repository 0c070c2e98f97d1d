"""Credentials and tokens: argon2 passwords, opaque session tokens, customer
tokens bound to one conversation, and customers' signed identity tokens."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import secrets
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from ..config import IdentityTokenConfig
from ..errors import exhausted, unauthenticated

T = TypeVar("T")

# Claims that describe the token, not the customer.
_REGISTERED_CLAIMS = {"iss", "aud", "exp", "nbf", "iat", "jti"}


class Passwords:
    def __init__(self, time_cost: int = 3, memory_kib: int = 65536):
        self._ph = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib)
        # Verifying an unknown user costs as much as a known one.
        self._dummy = self._ph.hash(secrets.token_hex(8))

    def hash(self, password: str) -> str:
        return self._ph.hash(password)

    def verify(self, password_hash: str | None, password: str) -> bool:
        try:
            return self._ph.verify(password_hash or self._dummy, password) and password_hash is not None
        except (VerificationError, InvalidHashError):
            return False


class PasswordPool:
    """argon2 on its own small pool. A burst of (wrong) logins then neither takes the threads that
    file I/O runs on nor grows memory: argon2id holds memory_kib per running hash, and at most
    `workers` run. Past `max_waiting` queued checks, a login is refused as busy at once."""

    def __init__(self, passwords: Passwords, workers: int = 2, max_waiting: int = 64):
        self.passwords = passwords
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="argon2")
        self._max_waiting = max_waiting
        self._waiting = 0

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        if self._waiting >= self._max_waiting:
            raise exhausted("SERVER_BUSY", "Too many logins at once; try again in a moment.", retry_after=1.0)
        self._waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self._waiting -= 1

    async def verify(self, password_hash: str | None, password: str) -> bool:
        return await self._run(self.passwords.verify, password_hash, password)

    async def hash(self, password: str) -> str:
        return await self._run(self.passwords.hash, password)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def new_token(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def customer_token(secret: bytes, conversation_id: str) -> str:
    """Names its conversation; deterministic, so a retried StartChat returns the same token."""
    mac = hmac.new(secret, f"customer:{conversation_id}".encode(), hashlib.sha256).digest()
    return f"qc_{conversation_id}." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def check_customer_token(secret: bytes, conversation_id: str, token: str) -> bool:
    if not token.isascii():  # compare_digest refuses non-ASCII str: such a token is simply wrong
        return False
    return hmac.compare_digest(customer_token(secret, conversation_id), token)


@dataclass(frozen=True)
class IdentityClaims:
    variables: dict[str, str]
    jti: str | None = None
    expires_at: datetime | None = None
    subject: str | None = None


def _variable(value: object) -> str | None:
    """A claim as a variable: JSON's true/false stay true/false (not Python's True); objects and lists are skipped."""
    if value is None or isinstance(value, (dict, list)):
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def verify_identity_token(
    token: str,
    signers: Sequence[IdentityTokenConfig],
    *,
    leeway: float = 30.0,
    max_lifetime: float = 3600.0,
    now: float | None = None,
) -> IdentityClaims:
    """HS256 JWT signed by the hosting site; its claims become authenticated variables.

    The signer whose secret verifies the signature decides: its audience and issuer are checked when
    configured (a token's aud or iss is ignored otherwise). exp is required; exp, nbf and iat get
    `leeway` seconds of clock skew; a token may not claim to live longer than max_lifetime."""
    if not signers:
        raise unauthenticated("IDENTITY_TOKEN_NOT_ACCEPTED", "This server has no identity-token secret configured.")
    claims: dict[str, Any] | None = None
    bad = "IDENTITY_TOKEN_INVALID"
    for signer in signers:
        try:
            claims = jwt.decode(
                token,
                signer.secret,
                algorithms=["HS256"],
                audience=signer.audience,
                issuer=signer.issuer,
                leeway=leeway,
                options={"require": ["exp"], "verify_aud": signer.audience is not None},
            )
            break
        except jwt.InvalidSignatureError:
            continue  # perhaps another signer's
        except jwt.ExpiredSignatureError:
            raise unauthenticated("IDENTITY_TOKEN_EXPIRED", "The identity token has expired.") from None
        except jwt.ImmatureSignatureError:
            raise unauthenticated(bad, "The identity token is not valid yet (nbf or iat is in the future).") from None
        except (jwt.InvalidAudienceError, jwt.InvalidIssuerError, jwt.MissingRequiredClaimError) as e:
            raise unauthenticated(bad, f"The identity token is not valid: {_reason(e)}.") from None
        except jwt.PyJWTError:
            raise unauthenticated(bad, "The identity token is not valid: not a well-formed HS256 token.") from None
    if claims is None:
        raise unauthenticated(bad, "The identity token is not valid: its signature does not verify.")
    exp = claims["exp"]
    iat = claims.get("iat")
    now = time.time() if now is None else now
    if not isinstance(exp, (int, float)) or (iat is not None and not isinstance(iat, (int, float))):
        raise unauthenticated("IDENTITY_TOKEN_INVALID", "The identity token is not valid: its times are not numbers.")
    lifetime = exp - (iat if iat is not None else now)
    if lifetime > max_lifetime + leeway:
        raise unauthenticated(
            "IDENTITY_TOKEN_INVALID",
            f"The identity token is not valid: it may live at most {max_lifetime:g} s, and claims {lifetime:.0f} s.",
        )
    jti = claims.get("jti")
    sub = claims.get("sub")
    variables = {}
    for name, value in claims.items():
        text = None if name in _REGISTERED_CLAIMS else _variable(value)
        if text is not None:
            variables[name] = text
    return IdentityClaims(
        variables,
        jti=str(jti)[:200] if jti is not None else None,
        expires_at=datetime.fromtimestamp(exp, UTC),
        subject=str(sub)[:200] if sub is not None else None,
    )


def _reason(e: Exception) -> str:
    """PyJWT's own words for audience, issuer and missing claims are fit for a client; nothing else is."""
    return str(e).rstrip(".")[:200] or type(e).__name__
