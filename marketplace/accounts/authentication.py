"""DRF authentication by `Authorization: Bearer hk_…` API keys."""

from __future__ import annotations

from typing import Any

from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.request import Request

from marketplace.accounts.models import User
from marketplace.accounts.selectors import api_key_authenticate
from marketplace.accounts.services import API_KEY_KIND


def request_user(request: Request) -> User:
    """The authenticated user of a request that passed IsAuthenticated."""
    user = request.user
    if not isinstance(user, User):
        raise exceptions.NotAuthenticated()
    return user


def bearer_secret(request: Request, *, kind: str) -> str | None:
    """The `Bearer` secret of the given kind (`hk`, `ht`, …), or None to let another scheme try."""
    parts = get_authorization_header(request).split()
    if not parts or parts[0].lower() != b"bearer":
        return None
    if len(parts) != 2:
        raise exceptions.AuthenticationFailed("Authorization header must be 'Bearer <secret>'")
    plaintext = parts[1].decode(errors="replace")
    return plaintext if plaintext.startswith(f"{kind}_") else None


class ApiKeyAuthentication(BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[Any, Any] | None:
        plaintext = bearer_secret(request, kind=API_KEY_KIND)
        if plaintext is None:
            return None
        key = api_key_authenticate(plaintext=plaintext)
        if key is None:
            raise exceptions.AuthenticationFailed("API key is invalid or revoked")
        return key.user, key

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="api"'
