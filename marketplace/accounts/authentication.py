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


class ApiKeyAuthentication(BaseAuthentication):
    keyword = b"bearer"

    def authenticate(self, request: Request) -> tuple[Any, Any] | None:
        parts = get_authorization_header(request).split()
        if not parts or parts[0].lower() != self.keyword:
            return None
        if len(parts) != 2:
            raise exceptions.AuthenticationFailed("Authorization header must be 'Bearer <api key>'")
        plaintext = parts[1].decode(errors="replace")
        if not plaintext.startswith(f"{API_KEY_KIND}_"):
            return None
        key = api_key_authenticate(plaintext=plaintext)
        if key is None:
            raise exceptions.AuthenticationFailed("API key is invalid or revoked")
        return key.user, key

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="api"'
