"""Credentials and tokens: argon2 passwords, opaque session tokens, customer
tokens bound to one conversation, and customers' signed identity tokens."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from ..errors import unauthenticated

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


def new_token(prefix: str) -> str:
    return f"{prefix}_{secrets.token_urlsafe(32)}"


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def customer_token(secret: bytes, conversation_id: str) -> str:
    """Names its conversation; deterministic, so a retried StartChat returns the same token."""
    mac = hmac.new(secret, f"customer:{conversation_id}".encode(), hashlib.sha256).digest()
    return f"qc_{conversation_id}." + base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def check_customer_token(secret: bytes, conversation_id: str, token: str) -> bool:
    return hmac.compare_digest(customer_token(secret, conversation_id), token)


@dataclass(frozen=True)
class IdentityClaims:
    variables: dict[str, str]


def verify_identity_token(token: str, secrets_: list[str]) -> IdentityClaims:
    """HS256 JWT signed by the hosting site; its claims become authenticated variables."""
    if not secrets_:
        raise unauthenticated("IDENTITY_TOKEN_NOT_ACCEPTED", "This server has no identity-token secret configured.")
    last: Exception | None = None
    for secret in secrets_:
        try:
            claims = jwt.decode(token, secret, algorithms=["HS256"], options={"require": ["exp"]})
            break
        except jwt.ExpiredSignatureError:
            raise unauthenticated("IDENTITY_TOKEN_EXPIRED", "The identity token has expired.") from None
        except jwt.InvalidSignatureError as e:
            last = e
        except jwt.PyJWTError as e:
            raise unauthenticated("IDENTITY_TOKEN_INVALID", f"The identity token is not valid: {e}.") from None
    else:
        raise unauthenticated("IDENTITY_TOKEN_INVALID", f"The identity token is not valid: {last}.")
    variables = {}
    for name, value in claims.items():
        if name in _REGISTERED_CLAIMS or value is None or isinstance(value, (dict, list)):
            continue
        variables[name] = str(value)
    return IdentityClaims(variables)
