"""Shared fixtures: users, API clients, the catalog, a host."""

from __future__ import annotations

from typing import Any

import pytest
from rest_framework.test import APIClient

from tests.factories import HostFactory, UserFactory


@pytest.fixture
def catalog(db: Any) -> Any:
    from marketplace.catalog.services import catalog_builtin_sync

    return catalog_builtin_sync()[0]


@pytest.fixture
def buyer(db: Any) -> Any:
    return UserFactory(role="buyer")


@pytest.fixture
def other_buyer(db: Any) -> Any:
    return UserFactory(role="buyer")


@pytest.fixture
def host_owner(db: Any) -> Any:
    return UserFactory(role="host")


@pytest.fixture
def host(host_owner: Any) -> Any:
    return HostFactory(owner=host_owner)


@pytest.fixture
def api(buyer: Any) -> APIClient:
    """An API client authenticated with a real API key of `buyer`."""
    from marketplace.accounts.services import api_key_create

    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key_create(user=buyer, name='tests').plaintext}")
    return client


@pytest.fixture
def other_api(other_buyer: Any) -> APIClient:
    from marketplace.accounts.services import api_key_create

    client = APIClient()
    client.credentials(
        HTTP_AUTHORIZATION=f"Bearer {api_key_create(user=other_buyer, name='tests').plaintext}"
    )
    return client
