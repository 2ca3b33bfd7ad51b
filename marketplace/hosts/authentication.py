"""DRF authentication for agents: `Authorization: Bearer ht_…` host tokens."""

from __future__ import annotations

from typing import Any

from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication, get_authorization_header
from rest_framework.request import Request

from marketplace.hosts.services import HOST_TOKEN_KIND, host_authenticate


class HostTokenAuthentication(BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[Any, Any] | None:
        parts = get_authorization_header(request).split()
        if len(parts) != 2 or parts[0].lower() != b"bearer":
            return None
        plaintext = parts[1].decode(errors="replace")
        if not plaintext.startswith(f"{HOST_TOKEN_KIND}_"):
            return None
        host = host_authenticate(host_token=plaintext)
        if host is None:
            raise exceptions.AuthenticationFailed("host token is invalid or revoked")
        return host.owner, host

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="agent"'
