"""What an agent's connection costs the server's database threads: hellos, ready frames and socket ends
that arrive together are each one transaction of a few statements."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from hearth_agent import protocol
from marketplace.gateway.consumers import _hellos_accept, _hellos_write, _readies_accept, _readies_write
from marketplace.hosts.models import Host
from marketplace.hosts.services import Readying, SessionGone, SessionOpening, hosts_disconnect
from marketplace.jobs.services import check_job_spec, job_submit
from marketplace.trust.models import HostSession
from tests.factories import HostFactory, host_with_token
from tests.frames import hello_payload

pytestmark = pytest.mark.django_db


def _offline_host(**fields: Any) -> tuple[Any, str]:
    return host_with_token(status=Host.Status.OFFLINE, ready=False, channel_name="", **fields)


def _statements(captured: CaptureQueriesContext) -> list[str]:
    # Savepoints are the test's transaction showing through; in production they are BEGIN/COMMIT.
    return [q["sql"] for q in captured.captured_queries if "SAVEPOINT" not in q["sql"]]


def _hello_accept(*, host_token: str, channel_name: str, hello: protocol.HelloPayload) -> Any:
    """One hello, as the gateway records a batch of one."""
    return _hellos_accept([SessionOpening(host_token, channel_name, hello)])[0]


def test_a_hello_checks_the_token_and_opens_the_session_in_five_statements() -> None:
    host, token = _offline_host()
    with CaptureQueriesContext(connection) as captured:
        accepted = _hello_accept(host_token=token, channel_name="chan.new", hello=hello_payload(slots=3))
    # The row locked by its token, leases to requeue, the session's columns, the old session
    # closed, the new one opened.
    assert len(_statements(captured)) <= 5, _statements(captured)
    assert accepted is not None and accepted[0] == host.pk
    host.refresh_from_db()
    assert (host.status, host.channel_name, host.slots) == (Host.Status.ONLINE, "chan.new", 3)
    assert HostSession.objects.filter(host=host, channel_name="chan.new", ended_at__isnull=True).count() == 1


def test_a_hello_with_a_revoked_token_is_refused_and_changes_nothing() -> None:
    host, token = _offline_host(revoked_at=timezone.now())
    with CaptureQueriesContext(connection) as captured:
        assert _hello_accept(host_token=token, channel_name="chan.new", hello=hello_payload()) is None
    assert len(_statements(captured)) == 1
    host.refresh_from_db()
    assert (host.status, host.channel_name) == (Host.Status.OFFLINE, "")
    assert not HostSession.objects.filter(host=host).exists()


def test_a_hello_with_an_unknown_token_is_refused() -> None:
    _offline_host()
    assert _hello_accept(host_token="ht_not-a-token", channel_name="chan.new", hello=hello_payload()) is None


def test_the_config_frame_after_a_hello_carries_the_owners_policy() -> None:
    _, token = _offline_host(policy={"battery_reserve_pct": 40})
    accepted = _hello_accept(host_token=token, channel_name="chan.new", hello=hello_payload())
    assert accepted is not None
    assert accepted[1].battery_reserve_pct == 40


def _ready(host: Any, channel_name: str | None = None, isolation: list[str] | None = None) -> Readying:
    payload = protocol.ReadyPayload(models=[], free_slots=1, isolation=isolation or [])
    return Readying(host.pk, channel_name or host.channel_name, payload)


def test_many_ready_frames_at_once_cost_the_statements_of_one_and_only_unverified_hosts_claim_when_nothing_is_queued() -> (
    None
):
    verified = [HostFactory.create(ready=False) for _ in range(10)]
    unverified = [HostFactory.create(ready=False, verified_at=None) for _ in range(10)]
    replaced = HostFactory.create(ready=False)
    with CaptureQueriesContext(connection) as one:
        first = _readies_accept([_ready(verified[0], isolation=["bwrap"])])
    readies = [_ready(host, isolation=["bwrap", "netns"]) for host in [*verified[1:], *unverified]]
    readies.append(_ready(replaced, channel_name="chan.before-the-reconnect"))
    with CaptureQueriesContext(connection) as twenty:
        claims = _readies_accept(readies)
    # The rows locked in id order, the one UPDATE, whether anything is queued.
    assert len(_statements(twenty)) == len(_statements(one)) <= 3, _statements(twenty)
    assert first == [False]  # verified, nothing queued: nothing to claim
    assert claims == [False] * 9 + [True] * 10 + [False]  # the unverified get known-answer tasks
    rows = dict(Host.objects.values_list("pk", "ready"))
    assert all(rows[host.pk] for host in [*verified, *unverified])
    assert rows[replaced.pk] is False  # a replaced connection's frame records nothing
    assert Host.objects.get(pk=verified[1].pk).isolation == ["bwrap", "netns"]


def test_ready_frames_of_verified_hosts_claim_when_a_task_is_queued(buyer: Any, catalog: Any) -> None:
    host = HostFactory.create(ready=False)
    spec = check_job_spec(model_name="all-MiniLM-L6-v2", inputs=["a", "b"], task_size=2)
    job_submit(buyer=buyer, spec=spec)
    assert _readies_accept([_ready(host), _ready(host, channel_name="chan.stale")]) == [True, False]


@pytest.mark.django_db(transaction=True)
def test_a_ready_frame_that_cannot_be_recorded_fails_only_its_own_socket_not_the_others_in_its_batch() -> (
    None
):
    good = HostFactory.create(ready=False, verified_at=None)
    bad = HostFactory.create(ready=False)
    # An id that is no UUID stands for any frame whose write fails.
    broken = Readying("not-a-host-id", bad.channel_name, protocol.ReadyPayload(models=[], free_slots=1))  # type: ignore[arg-type]
    answers = asyncio.run(_readies_write([_ready(good), broken]))
    assert answers[0] is True
    assert isinstance(answers[1], Exception)
    assert Host.objects.get(pk=good.pk).ready
    assert not Host.objects.get(pk=bad.pk).ready


def test_many_sessions_ending_at_once_cost_the_statements_of_one() -> None:
    hosts = [HostFactory.create() for _ in range(21)]
    for host in hosts:
        HostSession.objects.create(host=host, channel_name=host.channel_name, started_at=timezone.now())
    ends = [SessionGone(host.pk, host.channel_name, "agent disconnected (code 1006)") for host in hosts]
    with CaptureQueriesContext(connection) as one:
        hosts_disconnect(sessions=ends[:1])
    with CaptureQueriesContext(connection) as twenty:
        hosts_disconnect(sessions=ends[1:])
    # The rows locked, marked offline; leases to requeue (none); sessions closed; the scores.
    assert len(_statements(twenty)) == len(_statements(one)) <= 9, _statements(twenty)
    assert not Host.objects.filter(status=Host.Status.ONLINE).exists()
    assert not HostSession.objects.filter(ended_at__isnull=True).exists()


def _opening(token: str, channel_name: str, **unchecked: Any) -> SessionOpening:
    """A hello of `token` on `channel_name`; `unchecked` values bypass the protocol's validation."""
    hello = protocol.HelloPayload.model_construct(**{**hello_payload().model_dump(), **unchecked})
    return SessionOpening(token, channel_name, hello)


def test_many_hellos_at_once_cost_the_statements_of_one_and_each_gets_its_own_answer() -> None:
    tokens = [_offline_host()[1] for _ in range(21)]
    with CaptureQueriesContext(connection) as one:
        first = _hellos_accept([_opening(tokens[0], "chan.0")])
    openings = [_opening(token, f"chan.{i}") for i, token in enumerate(tokens[1:], 1)]
    openings.insert(5, _opening("ht_not-a-token", "chan.unknown"))
    with CaptureQueriesContext(connection) as twenty:
        answers = _hellos_accept(openings)
    assert len(_statements(twenty)) == len(_statements(one)) <= 5, _statements(twenty)
    assert answers[5] is None
    del answers[5], openings[5]
    assert first[0] is not None and all(answer is not None for answer in answers)
    channels = dict(Host.objects.values_list("pk", "channel_name"))
    assert [channels[answer[0]] for answer in answers if answer] == [o.channel_name for o in openings]
    assert HostSession.objects.filter(ended_at__isnull=True).count() == 21


def test_a_host_that_says_hello_twice_in_one_batch_keeps_its_later_connection(
    django_capture_on_commit_callbacks: Any,
) -> None:
    host, token = _offline_host()
    with django_capture_on_commit_callbacks() as callbacks:
        answers = _hellos_accept([_opening(token, "chan.early"), _opening(token, "chan.late")])
    assert [answer[0] if answer else None for answer in answers] == [host.pk, host.pk]
    host.refresh_from_db()
    assert host.channel_name == "chan.late"
    assert list(
        HostSession.objects.filter(host=host, ended_at__isnull=True).values_list("channel_name", flat=True)
    ) == ["chan.late"]
    assert len(callbacks) == 1  # the early socket is told it was replaced, once the batch commits


@pytest.mark.django_db(transaction=True)
def test_a_hello_that_cannot_be_recorded_closes_only_its_own_socket_not_the_others_in_its_batch() -> None:
    (good, good_token), (_, bad_token) = _offline_host(), _offline_host()
    openings = [_opening(good_token, "chan.good"), _opening(bad_token, "chan.bad", slots=-1)]
    answers = asyncio.run(_hellos_write(openings))
    assert isinstance(answers[1], Exception)
    assert answers[0] is not None and not isinstance(answers[0], Exception) and answers[0][0] == good.pk
    assert Host.objects.get(pk=good.pk).channel_name == "chan.good"
    assert Host.objects.get(channel_name="").status == Host.Status.OFFLINE
