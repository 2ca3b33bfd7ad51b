"""Writes for hosts: enrollment, tokens, and the life of an agent connection."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import connection, transaction
from django.db.models import Field
from django.utils import timezone

from hearth_agent import protocol
from hearth_agent.policy import EnergyPolicy
from marketplace.accounts.models import User
from marketplace.accounts.tokens import secret_digest, secret_issue
from marketplace.config.bounded import BoundedCache
from marketplace.config.sql import sql_column, sql_table, sql_values_row
from marketplace.gateway import notify
from marketplace.hosts.models import EnrollmentToken, Host
from marketplace.hosts.presence import Beat, presence_store
from marketplace.matching.regions import check_region
from marketplace.trust.services import host_benchmark_record, scores_update, sessions_end, sessions_start

ENROLLMENT_KIND = "he"
HOST_TOKEN_KIND = "ht"


@dataclass(frozen=True)
class CreatedEnrollmentToken:
    token: EnrollmentToken
    plaintext: str


def enrollment_token_create(*, owner: User) -> CreatedEnrollmentToken:
    issued = secret_issue(ENROLLMENT_KIND)
    token = EnrollmentToken.objects.create(
        owner=owner,
        prefix=issued.prefix,
        digest=issued.digest,
        expires_at=timezone.now() + timedelta(seconds=settings.HEARTH_ENROLLMENT_TOKEN_TTL_S),
    )
    return CreatedEnrollmentToken(token=token, plaintext=issued.plaintext)


@dataclass(frozen=True)
class EnrolledHost:
    host: Host
    host_token: str


@transaction.atomic
def host_enroll(*, enrollment_token: str, name: str) -> EnrolledHost:
    """Exchange a one-time enrollment token for a host and its long-lived token.

    The conditional update on `used_at IS NULL` makes the exchange happen once
    even when two agents race with the same token.
    """
    name = name.strip()[:100]
    if not name:
        raise ValidationError({"name": ["a machine needs a name"]})
    now = timezone.now()
    token = EnrollmentToken.objects.filter(digest=secret_digest(enrollment_token)).first()
    if token is None or token.expires_at <= now:
        raise ValidationError({"token": ["enrollment token is invalid or expired"]})
    claimed = EnrollmentToken.objects.filter(pk=token.pk, used_at__isnull=True).update(used_at=now)
    if claimed != 1:
        raise ValidationError({"token": ["enrollment token was already used"]})
    issued = secret_issue(HOST_TOKEN_KIND)
    host = Host.objects.create(
        owner=token.owner, name=name, token_prefix=issued.prefix, token_digest=issued.digest
    )
    EnrollmentToken.objects.filter(pk=token.pk).update(host=host)
    return EnrolledHost(host=host, host_token=issued.plaintext)


def host_authenticate(*, host_token: str) -> Host | None:
    return Host.objects.filter(token_digest=secret_digest(host_token), revoked_at__isnull=True).first()


@transaction.atomic
def host_token_revoke(*, host: Host) -> Host:
    """Revoke the host's token; its live socket is closed after commit."""
    from marketplace.jobs.services import tasks_requeue_for_host

    Host.objects.filter(pk=host.pk, revoked_at__isnull=True).update(
        revoked_at=timezone.now(), status=Host.Status.OFFLINE, ready=False, channel_name=""
    )
    tasks_requeue_for_host(host_id=host.pk, reason="host token revoked")
    if host.channel_name:
        notify.on_commit_close(host.channel_name, protocol.CloseCode.TOKEN_REVOKED)
    host.refresh_from_db()
    return host


def _offline_after(now: datetime) -> datetime:
    beats = settings.HEARTH_OFFLINE_AFTER_BEATS * settings.HEARTH_HEARTBEAT_INTERVAL_S
    return now + timedelta(seconds=beats)


@transaction.atomic
def host_connect(*, host_id: uuid.UUID, channel_name: str, hello: protocol.HelloPayload) -> Host:
    """Record a new live connection; an older connection of the same host is closed.

    A new session holds no leases (agents drop theirs with the old socket), so
    whatever the host still held is requeued now rather than at lease expiry.
    """
    host = Host.objects.select_for_update().get(pk=host_id)
    _sessions_open([(host, channel_name, hello)])
    return host


@dataclass(frozen=True)
class SessionOpening:
    """A connection's `hello`, with the token it presented and its channel."""

    host_token: str
    channel_name: str
    hello: protocol.HelloPayload


@transaction.atomic
def hosts_connect_with_tokens(*, openings: Sequence[SessionOpening]) -> list[Host | None]:
    """`host_authenticate` and `host_connect` of many connections in one read of their rows, under
    their locks (a token revoked meanwhile cannot open a session), each statement once for all of
    them: a reconnect storm opens hundreds of sessions a second. One result per opening, in order:
    the host, or None for an unknown or revoked token. A host named twice keeps its later
    connection and the earlier is closed as replaced, as if they had come one after the other."""
    digests = [secret_digest(opening.host_token) for opening in openings]
    # Locked in one order, so two batches cannot deadlock each other.
    found = {
        host.token_digest: host
        for host in Host.objects.select_for_update()
        .filter(token_digest__in=set(digests), revoked_at__isnull=True)
        .order_by("pk")
    }
    _sessions_open(
        [
            (found[digest], opening.channel_name, opening.hello)
            for digest, opening in zip(digests, openings, strict=True)
            if digest in found
        ]
    )
    return [found.get(digest) for digest in digests]


# What a session writes on the host row, with each column's type for PostgreSQL's VALUES list.
_SESSION_COLUMNS = {
    "channel_name": "", "status": "", "ready": "boolean", "draining": "boolean", "draining_reason": "",
    "connected_at": "timestamptz", "last_seen_at": "timestamptz", "offline_after": "timestamptz",
    "agent_version": "", "slots": "integer", "device": "", "memory_mb": "integer",
    "isolation": "jsonb", "capabilities": "jsonb",
}  # fmt: skip


def _sessions_open(opened: list[tuple[Host, str, protocol.HelloPayload]]) -> None:
    """Precondition: the caller's transaction holds the hosts' row locks."""
    from marketplace.jobs.services import tasks_requeue_for_hosts

    if not opened:
        return
    now = timezone.now()
    for host, channel_name, hello in opened:
        if host.channel_name and host.channel_name != channel_name:
            notify.on_commit_close(host.channel_name, protocol.CloseCode.REPLACED)
        host.channel_name = channel_name
        host.status = Host.Status.ONLINE
        host.ready = host.draining = False
        host.draining_reason = ""
        host.connected_at = host.last_seen_at = now
        host.offline_after = _offline_after(now)
        host.agent_version = hello.agent_version
        host.slots = hello.slots
        host.device = hello.device
        host.memory_mb = hello.memory_mb
        host.isolation = list(hello.isolation)
        host.capabilities = hello.model_dump(mode="json", exclude={"slots", "isolation", "benchmark"})
    hosts = list({host.pk: host for host, _, _ in opened}.values())
    tasks_requeue_for_hosts(reasons=dict.fromkeys((host.pk for host in hosts), "agent started a new session"))
    _sessions_write(hosts)
    sessions_start(started=[(host.pk, host.channel_name) for host in hosts], now=now)
    for host, channel_name, hello in opened:
        if hello.benchmark is not None and host.channel_name == channel_name:
            host_benchmark_record(host_id=host.pk, report=hello.benchmark)
            host.refresh_from_db()


def _sessions_write(hosts: list[Host]) -> None:
    """The session's columns of each host row (not all of the row's fifty-odd), in one
    `UPDATE … FROM (VALUES …)`: the ORM's `bulk_update`, a CASE with a WHEN per host and column,
    costs more to compile than the write."""
    table = sql_table(Host)
    fields = [Host._meta.get_field(name) for name in ("id", *_SESSION_COLUMNS)]
    row = sql_values_row("uuid", *_SESSION_COLUMNS.values())
    params: list[Any] = []
    for host in hosts:
        params += [field.get_db_prep_save(getattr(host, field.attname), connection) for field in fields]  # type: ignore[union-attr]
    names = ", ".join(sql_column(Host, name) for name in ("id", *_SESSION_COLUMNS))
    assignments = ", ".join(
        f"{sql_column(Host, name)} = opened.{sql_column(Host, name)}" for name in _SESSION_COLUMNS
    )
    sql = (
        f"WITH opened ({names}) AS (VALUES {', '.join([row] * len(hosts))}) "
        f"UPDATE {table} SET {assignments} FROM opened "
        f"WHERE {table}.{sql_column(Host, 'id')} = opened.{sql_column(Host, 'id')}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)


@dataclass(frozen=True)
class Readying:
    """A connection's `ready` frame, waiting to be recorded with others that arrived together."""

    host_id: uuid.UUID
    channel_name: str
    payload: protocol.ReadyPayload


@dataclass(frozen=True)
class ReadyAnswer:
    current: bool  # the frame's connection is still the host's (a replaced one records nothing)
    verified: bool


@transaction.atomic
def hosts_ready(readies: list[Readying]) -> list[ReadyAnswer]:
    """Mark the hosts of these connections ready, with the sandbox layers each worker got, in two
    statements: the rows locked in id order (as every batch of host rows is, so two batches cannot
    deadlock), then one `UPDATE … FROM (VALUES …)`.
    For each frame, whether its connection is still current and whether its host is verified.
    A reconnect storm readies hundreds of hosts a second."""
    if not readies:
        return []
    ids = {ready.host_id for ready in readies}
    list(Host.objects.select_for_update().filter(pk__in=ids).order_by("pk").values_list("pk", flat=True))
    table, key = sql_table(Host), sql_column(Host, "id")
    fields = [Host._meta.get_field(name) for name in ("id", "channel_name", "isolation")]
    params: list[Any] = []
    for ready in readies:
        values = (ready.host_id, ready.channel_name, list(ready.payload.isolation))
        for field, value in zip(fields, values, strict=True):
            assert isinstance(field, Field)
            params.append(field.get_db_prep_save(value, connection))
    channel, isolation, ready_column = (
        sql_column(Host, name) for name in ("channel_name", "isolation", "ready")
    )
    sql = (
        f"WITH readied (id, channel_name, isolation) AS "
        f"(VALUES {', '.join([sql_values_row('uuid', '', 'jsonb')] * len(readies))}) "
        f"UPDATE {table} SET {ready_column} = %s, {isolation} = readied.isolation FROM readied "
        f"WHERE {table}.{key} = readied.id AND {table}.{channel} = readied.channel_name "
        f"RETURNING {table}.{key}, {table}.{channel}, {table}.{sql_column(Host, 'verified_at')}"
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, [*params, True])
        # The timestamp itself, not `IS NOT NULL`: SQLite 3.40 answered 1 for a NULL there.
        written = {
            (row_id if isinstance(row_id, uuid.UUID) else uuid.UUID(str(row_id)), row_channel): verified_at
            is not None
            for row_id, row_channel, verified_at in cursor.fetchall()
        }
    return [
        ReadyAnswer(
            current=(ready.host_id, ready.channel_name) in written,
            verified=written.get((ready.host_id, ready.channel_name), False),
        )
        for ready in readies
    ]


def host_heartbeat(
    *, host_id: uuid.UUID, channel_name: str, payload: protocol.HeartbeatPayload, now: datetime | None = None
) -> None:
    """Note that the connection is alive and which leases it holds (`hosts_heartbeats` of one)."""
    hosts_heartbeats([heartbeat_beat(host_id=host_id, channel_name=channel_name, payload=payload, now=now)])


def heartbeat_beat(
    *, host_id: uuid.UUID, channel_name: str, payload: protocol.HeartbeatPayload, now: datetime | None = None
) -> Beat:
    """What the presence store keeps of a heartbeat frame."""
    return Beat(
        host_id=host_id, channel_name=channel_name, at=now or timezone.now(), running=tuple(payload.running)
    )


def hosts_heartbeats(beats: list[Beat]) -> None:
    """Note that these connections are alive and which leases they hold, in one write.

    The beats go to the presence store; the sweep's `hosts_presence_flush` moves `offline_after`
    and renews the leases. `HEARTH_PRESENCE=db` writes through at once instead (the old path).
    """
    if settings.HEARTH_PRESENCE == "db":
        _presence_write(beats)
        return
    presence_store().record_many(beats)


PRESENCE_BATCH = 500


def hosts_presence_flush() -> int:
    """Write the heartbeats recorded since the last flush; return how many connections they came from.

    Two UPDATEs per batch of `PRESENCE_BATCH` connections, however often each one beat. Only the
    connection a host row still names moves its `offline_after`: a replaced socket's beat cannot
    revive the host.
    """
    store = presence_store()
    beats = store.drain()
    for start in range(0, len(beats), PRESENCE_BATCH):
        try:
            _presence_write(beats[start : start + PRESENCE_BATCH])
        except Exception:
            # The database is away: keep what was not written for the next flush, or live hosts
            # would be swept for beats they did send. Writing a batch again is harmless.
            store.restore(beats[start:])
            raise
    return len(beats)


def _presence_write(beats: list[Beat]) -> None:
    from marketplace.jobs.services import leases_renew_many

    _hosts_seen(beats)
    leases_renew_many(held={(beat.host_id, beat.at): list(beat.running) for beat in beats if beat.running})


def _hosts_seen(beats: list[Beat]) -> None:
    """Each beat's host row, if it still names the beat's connection: seen then, offline a window
    later, online. One `UPDATE … FROM (VALUES …)` whose SQL is a string join: the ORM's version, a
    CASE with a WHEN per beat, took the Django compiler ~28% of a 2,000-agent server's time (py-spy),
    holding the GIL while heartbeat acks waited.

    Where rows lock (PostgreSQL), that statement takes only the rows it can lock at once: waiting
    for one host row while holding others, it closed deadlock cycles with transactions that lock a
    job and then a host (a result, a quarantine's requeue); in CI the sweep failed and a socket was
    closed with 1011. The beats whose rows were busy are then written one row per statement, each
    waiting while it holds nothing."""
    if not beats:
        return
    if not connection.features.has_select_for_update_skip_locked:
        _hosts_seen_write(beats, skip_locked=False)
        return
    written = _hosts_seen_write(beats, skip_locked=True)
    for beat in beats:
        if beat.host_id not in written:  # busy, or the row names another connection: then a no-op
            _hosts_seen_write([beat], skip_locked=False)


def _hosts_seen_write(beats: list[Beat], *, skip_locked: bool) -> set[uuid.UUID]:
    """The statement of `_hosts_seen`; the hosts it wrote when `skip_locked` (else an empty set)."""
    table = sql_table(Host)

    def column(name: str) -> str:
        return sql_column(Host, name)

    key = Host._meta.get_field("id")
    stamp = Host._meta.get_field("last_seen_at")
    row = sql_values_row("uuid", "", "timestamptz", "timestamptz")
    params: list[Any] = []
    for beat in beats:
        params += [
            key.get_db_prep_value(beat.host_id, connection),
            beat.channel_name,
            stamp.get_db_prep_value(beat.at, connection),
            stamp.get_db_prep_value(_offline_after(beat.at), connection),
        ]
    params.append(Host.Status.ONLINE.value)
    host_id = f"{table}.{column('id')}"
    free = (
        f", free AS (SELECT {column('id')} FROM {table} WHERE {column('id')} IN (SELECT host_id FROM beat) "
        f"FOR UPDATE SKIP LOCKED)"
        if skip_locked
        else ""
    )
    sql = (
        f"WITH beat (host_id, channel_name, seen, until) AS (VALUES {', '.join([row] * len(beats))}){free} "
        f"UPDATE {table} SET {column('last_seen_at')} = beat.seen, {column('offline_after')} = beat.until, "
        f"{column('status')} = %s "
        f"FROM beat WHERE {host_id} = beat.host_id "
        f"AND {table}.{column('channel_name')} = beat.channel_name"
        + (f" AND {host_id} IN (SELECT {column('id')} FROM free) RETURNING {host_id}" if skip_locked else "")
    )
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return {key.to_python(found) for (found,) in cursor.fetchall()} if skip_locked else set()


@dataclass(frozen=True)
class SessionGone:
    """A connection that ended: the host, the connection's channel, and why."""

    host_id: uuid.UUID
    channel_name: str
    reason: str


def host_disconnect(*, host_id: uuid.UUID, channel_name: str, reason: str) -> bool:
    """Mark the host offline and requeue its leases, unless a newer connection took over."""
    return bool(hosts_disconnect(sessions=[SessionGone(host_id, channel_name, reason)]))


def hosts_disconnect(*, sessions: Sequence[SessionGone]) -> list[uuid.UUID]:
    """`host_disconnect` of many connections, a few statements per batch of them (plus one per lease
    to requeue): a reconnect storm ends hundreds of sessions a second. Returns the hosts marked
    offline; a session that a newer connection of its host replaced changes nothing."""
    gone: list[uuid.UUID] = []
    for start in range(0, len(sessions), _DISCONNECT_BATCH):
        gone += _hosts_disconnect_batch(sessions[start : start + _DISCONNECT_BATCH])
    return gone


# Hosts per transaction: bounds the statements' parameters (SQLite allows 32,766) and the locks held.
_DISCONNECT_BATCH = 500


@transaction.atomic
def _hosts_disconnect_batch(sessions: Sequence[SessionGone]) -> list[uuid.UUID]:
    from marketplace.jobs.services import tasks_requeue_for_hosts

    ended = {(gone.host_id, gone.channel_name): gone.reason for gone in sessions}
    if not ended:
        return []
    # Locked in one order, so two batches cannot deadlock each other.
    current = Host.objects.select_for_update().filter(pk__in={host_id for host_id, _ in ended}).order_by("pk")
    reasons = {
        host_id: ended[(host_id, channel_name)]
        for host_id, channel_name in current.values_list("pk", "channel_name")
        if (host_id, channel_name) in ended
    }
    if not reasons:
        return []
    Host.objects.filter(pk__in=reasons).update(status=Host.Status.OFFLINE, ready=False, channel_name="")
    tasks_requeue_for_hosts(reasons=reasons)
    now = timezone.now()
    sessions_end(
        ended=[(host_id, channel_name) for host_id, channel_name in ended if host_id in reasons], now=now
    )
    scores_update(
        reasons={host_id: f"went offline: {reason}" for host_id, reason in reasons.items()}, now=now
    )
    return list(reasons)


def hosts_sweep_offline(*, now: datetime | None = None) -> int:
    """Hosts whose heartbeats stopped: offline, leases requeued, socket closed."""
    now = now or timezone.now()
    stale = list(
        Host.objects.filter(status=Host.Status.ONLINE, offline_after__lt=now).values_list(
            "pk", "channel_name"
        )
    )
    gone = set(
        hosts_disconnect(
            sessions=[
                SessionGone(host_id, channel_name, "heartbeats stopped") for host_id, channel_name in stale
            ]
        )
    )
    for host_id, channel_name in stale:
        if host_id in gone and channel_name:
            notify.close(channel_name, protocol.CloseCode.GOING_AWAY)
    return len(gone)


# ---- owner policy and drain --------------------------------------------------


def host_policy(*, host: Host) -> EnergyPolicy:
    """The host's energy policy, parsed. A dispatch round reads thousands of hosts whose policies
    are a few distinct documents, and parsing was most of a host view's cost, so each document is
    parsed once (the policy is frozen, so one instance can serve every host that stores it)."""
    key = repr(host.policy or {})  # faithful for JSON values, and cheaper than json.dumps
    policy = _POLICIES.get(key)
    if policy is None:
        policy = _POLICIES.put(key, EnergyPolicy.model_validate(host.policy or {}))
    return policy


# Parsed policies by their JSON: owners mostly keep the defaults or change the price, so few.
_POLICIES: BoundedCache[str, EnergyPolicy] = BoundedCache(limit=10_000)


@transaction.atomic
def host_policy_update(*, host: Host, changes: dict[str, object]) -> EnergyPolicy:
    """Apply the owner's changes (pydantic validates them), bump the version, push it live.

    Raises pydantic.ValidationError on bad values; nothing is stored then.
    """
    locked = Host.objects.select_for_update().get(pk=host.pk)
    current = host_policy(host=locked)
    # The server owns the version: the owner's changes cannot set it.
    policy = EnergyPolicy.model_validate({**current.model_dump(), **changes, "version": current.version + 1})
    Host.objects.filter(pk=host.pk).update(policy=policy.model_dump(mode="json"))
    if locked.channel_name:
        notify.on_commit_send(locked.channel_name, {"type": "agent.config"})
    host.refresh_from_db()
    return policy


@transaction.atomic
def host_update(*, host: Host, changes: dict[str, object]) -> Host:
    """The owner's changes to a machine's listing: `name` and `region` (blank for none).

    Raises ValidationError keyed by field, for unknown fields too; nothing is stored then. A
    machine online in a new region is poked, since work that asked for that region may wait.
    """
    unknown = sorted(set(changes) - {"name", "region"})
    if unknown:
        raise ValidationError(
            {field: ["not a field you can change here (name, region)"] for field in unknown}
        )
    fields: dict[str, object] = {}
    if "region" in changes:
        fields["region"] = check_region(changes["region"])
    if "name" in changes:
        name = changes["name"]
        if not isinstance(name, str) or not name.strip() or len(name.strip()) > 100:
            raise ValidationError({"name": ["name must be 1 to 100 characters"]})
        fields["name"] = name.strip()
    locked = Host.objects.select_for_update().get(pk=host.pk)
    Host.objects.filter(pk=host.pk).update(**fields)
    if fields.get("region", locked.region) != locked.region and locked.channel_name:
        notify.on_commit_send(locked.channel_name, {"type": "dispatch.poke"})
    host.refresh_from_db()
    return host


def host_set_draining(*, host_id: uuid.UUID, channel_name: str, payload: protocol.DrainPayload) -> None:
    Host.objects.filter(pk=host_id, channel_name=channel_name).update(
        draining=payload.draining, draining_reason=payload.reason[:200] if payload.draining else ""
    )
    if not payload.draining:
        notify.on_commit_dispatch()
