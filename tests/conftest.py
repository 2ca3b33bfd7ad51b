"""Shared fixtures: users, API clients, the catalog, a host."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rest_framework.test import APIClient

from tests.factories import HostFactory, UserFactory, api_client


@pytest.fixture(autouse=True, scope="session")
def _fast_password_hashing() -> Iterator[None]:
    """Users made in this process hash their passwords with MD5, not PBKDF2's million rounds
    (0.54 s a user here, most of a unit test's setup). Servers the tests start keep the real hasher."""
    from django.test.utils import override_settings

    with override_settings(PASSWORD_HASHERS=["django.contrib.auth.hashers.MD5PasswordHasher"]):
        yield


@pytest.fixture(scope="session")
def agent_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model and benchmark cache for every test stack's agents: the hardware is measured once
    per session, not once per stack (tests of the benchmark itself use their own)."""
    return tmp_path_factory.mktemp("shared-agent-cache")


@pytest.fixture
def catalog(db: Any) -> Any:
    from marketplace.catalog.services import catalog_builtin_sync

    return catalog_builtin_sync()[0]


TEST_CREDIT_MINOR = 1_000_000


def funded_buyer(credit_minor: int = TEST_CREDIT_MINOR) -> Any:
    """A buyer with credit (granted by the platform) to hold jobs' escrow with."""
    from marketplace.billing.services import credit_grant

    user: Any = UserFactory(role="buyer")
    if credit_minor:
        credit_grant(user=user, amount_minor=credit_minor, key=f"tests:{user.pk}", memo="test credit")
    return user


@pytest.fixture
def buyer(db: Any) -> Any:
    return funded_buyer()


@pytest.fixture
def other_buyer(db: Any) -> Any:
    return funded_buyer()


@pytest.fixture
def host_owner(db: Any) -> Any:
    return UserFactory(role="host")


@pytest.fixture
def host(host_owner: Any) -> Any:
    return HostFactory(owner=host_owner)


@pytest.fixture
def api(buyer: Any) -> APIClient:
    """An API client authenticated with a real API key of `buyer`."""
    return api_client(buyer)


@pytest.fixture
def other_api(other_buyer: Any) -> APIClient:
    return api_client(other_buyer)


@pytest.fixture
def owner_api(host: Any) -> APIClient:
    """An API client of the owner of `host`."""
    return api_client(host.owner)


@pytest.fixture(autouse=True)
def forget_shape_verdicts() -> Any:
    """A batch round remembers for a few seconds which jobs' shapes some host of the fleet could
    serve; each test has its own fleet, so none inherits another's readings."""
    from marketplace.matching import services

    services._SHAPE_VERDICTS.clear()
    yield
    services._SHAPE_VERDICTS.clear()


@pytest.fixture
def empty_presence_store() -> Any:
    """The presence store this run configures (memory, or Redis with REDIS_URL), empty before and
    after the test."""
    from marketplace.hosts.presence import presence_store

    presence_store().drain()
    yield
    presence_store().drain()
