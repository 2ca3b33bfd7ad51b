"""Stacks alive at the same time get a Redis database each, so one stack's Celery worker cannot drain
another's heartbeats or run its tasks against the wrong database (it did: the tests' shared stack
swept hosts of the stacks beside it). Runs where REDIS_URL is set."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from typing import Any

import pytest

from marketplace import devstack

pytestmark = pytest.mark.skipif(not os.environ.get("REDIS_URL"), reason="needs REDIS_URL")


def _client(url: str) -> Any:
    import redis

    return redis.Redis.from_url(url)


def test_two_stacks_get_two_emptied_databases_and_give_them_back_empty() -> None:
    base = os.environ["REDIS_URL"]
    first_token, second_token = uuid.uuid4().hex, uuid.uuid4().hex
    first = devstack._redis_claim(base, first_token)
    try:
        _client(first).set("hearth:presence:beats", "left by the first stack")
        second = devstack._redis_claim(base, second_token)
        try:
            assert second != first
            assert _client(second).get("hearth:presence:beats") is None
            assert _client(first).get("hearth:presence:beats") == b"left by the first stack"
        finally:
            devstack._redis_release(second, second_token)
    finally:
        devstack._redis_release(first, first_token)
    assert _client(first).dbsize() == 0
    assert _client(second).dbsize() == 0


def test_a_database_whose_stack_died_is_claimed_again_and_emptied() -> None:
    base = os.environ["REDIS_URL"]
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    dead_pid = int(dead.stdout)
    token = uuid.uuid4().hex
    url = devstack._redis_claim(base, token)
    devstack._redis_release(url, token)
    # The database as a killed test run leaves it: owned by a process that is gone, with its keys.
    _client(url).set(devstack._REDIS_OWNER_KEY, f"{dead_pid} {uuid.uuid4().hex}")
    _client(url).set("celery", "a queue nobody reads")

    again = devstack._redis_claim(base, token)
    try:
        assert again == url
        assert _client(url).get("celery") is None
        assert _client(url).get(devstack._REDIS_OWNER_KEY) == f"{os.getpid()} {token}".encode()
    finally:
        devstack._redis_release(again, token)


def test_a_stack_does_not_empty_a_database_another_stack_holds() -> None:
    base = os.environ["REDIS_URL"]
    token = uuid.uuid4().hex
    url = devstack._redis_claim(base, token)
    try:
        _client(url).set("hearth:presence:beats", "live")
        devstack._redis_release(url, uuid.uuid4().hex)
        assert _client(url).get("hearth:presence:beats") == b"live"
    finally:
        devstack._redis_release(url, token)
