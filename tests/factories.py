"""factory_boy factories for the models tests build directly."""

from __future__ import annotations

from typing import Any

import factory
from django.utils import timezone
from rest_framework.test import APIClient

from marketplace.accounts.models import User
from marketplace.accounts.services import api_key_create
from marketplace.accounts.tokens import secret_issue
from marketplace.hosts.models import Host


class UserFactory(factory.django.DjangoModelFactory[User]):
    class Meta:
        model = User

    email = factory.Sequence(lambda n: f"user{n}@example.com")
    username = factory.SelfAttribute("email")
    password = factory.django.Password("correct-horse-battery")


class HostFactory(factory.django.DjangoModelFactory[Host]):
    """An enrolled host, online and ready with two slots, as after `hello` + `ready`."""

    class Meta:
        model = Host

    owner = factory.SubFactory(UserFactory, role="host")
    name = factory.Sequence(lambda n: f"machine-{n}")
    token_prefix = "ht_test"
    token_digest = factory.LazyFunction(lambda: secret_issue("ht").digest)
    status = Host.Status.ONLINE
    ready = True
    channel_name = factory.Sequence(lambda n: f"test.channel.{n}")
    slots = 2
    memory_mb = 8192
    device = "cpu"
    # Verified as after its known-answer tasks, with a plausible benchmark (tests of trust start fresh).
    verified_at = factory.LazyFunction(timezone.now)
    hardware_ok = True
    reliability = 0.85


def host_with_token(**fields: Any) -> tuple[Any, str]:
    """A `HostFactory` host (with `fields`) and the plaintext host token an agent would present."""
    issued = secret_issue("ht")
    host = HostFactory(token_prefix=issued.prefix, token_digest=issued.digest, **fields)
    return host, issued.plaintext


def api_client(user: Any) -> APIClient:
    """An API client authenticated with a real API key of `user`."""
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key_create(user=user, name='tests').plaintext}")
    return client
