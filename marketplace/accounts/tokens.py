"""Secrets shown once and stored hashed: API keys, enrollment and host tokens.

The secrets are 256-bit random strings, so one SHA-256 is enough to store
them (a slow password hash buys nothing against a random 256-bit secret).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

PREFIX_LENGTH = 12


@dataclass(frozen=True)
class IssuedSecret:
    plaintext: str
    prefix: str
    digest: str


def secret_digest(plaintext: str) -> str:
    return hashlib.sha256(plaintext.encode()).hexdigest()


def secret_issue(kind: str) -> IssuedSecret:
    """A new secret like `hk_live_<random>`; `prefix` is what we may display."""
    plaintext = f"{kind}_{secrets.token_urlsafe(32)}"
    return IssuedSecret(
        plaintext=plaintext,
        prefix=plaintext[: len(kind) + 1 + PREFIX_LENGTH - 4],
        digest=secret_digest(plaintext),
    )


def secret_matches(plaintext: str, digest: str) -> bool:
    return hmac.compare_digest(secret_digest(plaintext), digest)
