"""DRF authentication for agents: `Authorization: Bearer ht_…` host tokens."""

from __future__ import annotations

from typing import Any

from rest_framework import exceptions
from rest_framework.authentication import BaseAuthentication
from rest_framework.request import Request

from marketplace.accounts.authentication import bearer_secret
from marketplace.hosts.services import HOST_TOKEN_KIND, host_authenticate


class HostTokenAuthentication(BaseAuthentication):
    def authenticate(self, request: Request) -> tuple[Any, Any] | None:
        plaintext = bearer_secret(request, kind=HOST_TOKEN_KIND)
        if plaintext is None:
            return None
        host = host_authenticate(host_token=plaintext)
        if host is None:
            raise exceptions.AuthenticationFailed("host token is invalid or revoked")
        return host.owner, host

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="agent"'
