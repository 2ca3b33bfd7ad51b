"""Dispatch at fleet scale: batch rounds (`tasks_claim_batch`) vs one task per transaction, same run.

    python -m bench.dispatch [--hosts 10000] [--tasks 100000] [--buyers 200] [--limit 20000] [--rate R]

Seeds simulated hosts (registered, verified, online; varied memory, price, region, power
reading, benchmark, reliability) and queued tasks across many buyers' jobs with bulk inserts.
Then, on one thread:

1. baseline: the naive claim, one task per transaction through the ORM (lock a queued task,
   lease it to the next host), for `--baseline-tasks` tasks → `baseline_tasks_per_s`;
2. sustained: batch rounds until the queue is empty; between rounds every leased task is marked
   done, as if the hosts had answered (untimed) → `tasks_per_s` (time spent in rounds only);
3. half load: tasks are submitted on a schedule at half the sustained rate (or at `--rate` per
   second, to compare runs at one load) for `--latency-s` seconds while rounds run; a task's
   latency is the end of the round that leased it minus its scheduled submit time (so waiting
   behind a running round counts) → `p50/p99_assign_ms`; the same from when the task's insert
   committed → `insert_to_assign_p50/p99_ms` (the part of the latency that is the dispatcher's:
   the rest is the submitting process running late on the shared cores);
4. restricted work: bursts of tasks for a job only a fifth of the fleet may take (region
   `ap-south`), each placed by rounds back to back → `restricted_rounds_mean/max` (rounds until
   the whole burst is leased) and `restricted_burst_p50/p99_ms`. A round samples hosts for the work
   waiting; a sample that fits work most hosts can take would leave such a burst waiting for rounds.

PostgreSQL: DATABASE_URL's server (a scratch database is created and dropped), or, without
DATABASE_URL, a throwaway cluster started here on a free loopback port. The last stdout line is
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import random
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench._args import positive_float, positive_int

# Tasks per second BOINC's scheduler reports handing out (the figure the issue compares with).
BOINC_TASKS_PER_S = 102.0
REGIONS = ("", "", "eu-west", "us-east", "ap-south")


def seed_fleet(*, hosts: int, buyers: int, rng: random.Random) -> tuple[Any, list[Any]]:
    """The model, and buyers; `hosts` verified online hosts with varied hardware, prices and power."""
    from django.utils import timezone

    from marketplace.accounts.models import User
    from marketplace.catalog.services import catalog_builtin_sync
    from marketplace.hosts.models import Host

    model = catalog_builtin_sync()[0]
    tag = uuid.uuid4().hex[:8]
    made_buyers = User.objects.bulk_create(
        User(username=f"b{i}.{tag}@bench", email=f"b{i}.{tag}@bench", role="buyer") for i in range(buyers)
    )
    owners = User.objects.bulk_create(
        User(username=f"o{i}.{tag}@bench", email=f"o{i}.{tag}@bench", role="host")
        for i in range(max(1, hosts // 10))
    )
    now = timezone.now()
    fleet = []
    for i in range(hosts):
        grid_w = rng.choice([-50.0, 0.0, 150.0, 400.0])  # ≤ 0: on solar/battery now
        fleet.append(
            Host(
                owner=owners[i % len(owners)],
                name=f"bench-{i}",
                token_prefix="ht_bench",
                token_digest=f"bench-{tag}-{i}",
                status=Host.Status.ONLINE,
                ready=True,
                channel_name=f"bench.host.{tag}.{i}",
                connected_at=now,
                last_seen_at=now,
                slots=rng.choice([1, 1, 2, 2, 4]),
                device="cuda",
                memory_mb=rng.choice([512, 4096, 8192, 16384, 24576]),
                policy={"price_per_1k_items_minor": rng.randint(10, 90)},
                region=rng.choice(REGIONS),
                power_source="grid" if grid_w > 0 else "solar",
                power_at=now,
                gpu_w=rng.uniform(50, 300),
                battery_soc_pct=rng.uniform(40, 100),
                solar_w=rng.uniform(0, 3000),
                grid_w=grid_w,
                load_w=rng.uniform(200, 900),
                benchmark={"minilm_items_per_s": rng.uniform(20, 1500)},
                benchmark_at=now,
                hardware_ok=True,
                verified_at=now,
                pass_streak=100,  # checked at the minimum canary rate, as a long-serving host is
                reliability=rng.uniform(0.5, 1.0),
            )
        )
    Host.objects.bulk_create(fleet, batch_size=2000)
    return model, made_buyers


def seed_tasks(*, model: Any, buyers: list[Any], tasks: int, jobs: int, rng: random.Random) -> list[Any]:
    """`tasks` queued tasks (10 short items each) in `jobs` jobs of the buyers, bulk-inserted."""
    from marketplace.jobs.models import Job, Task

    made = Job.objects.bulk_create(
        Job(
            buyer=buyers[i % len(buyers)],
            model=model,
            task_size=10,
            items_total=0,
            max_price_per_1k_minor=rng.choice([60, 80, 100, 100]),
            region=rng.choice(REGIONS + ("",) * 5),
            priority=rng.randint(0, 9),
            green_only=rng.random() < 0.05,
        )
        for i in range(jobs)
    )
    per_job = [tasks // jobs + (1 if i < tasks % jobs else 0) for i in range(jobs)]
    inputs = [f"item {n}" for n in range(10)]

    def rows() -> Iterator[Task]:
        for job, count in zip(made, per_job, strict=True):
            for index in range(count):
                task = Task(
                    job=job, index=index, first_item=index * 10, inputs=inputs, item_count=10, billable=True
                )
                task.group = task.pk
                yield task

    batch: list[Task] = []
    for task in rows():
        batch.append(task)
        if len(batch) == 5000:
            Task.objects.bulk_create(batch)
            batch = []
    Task.objects.bulk_create(batch)
    for job, count in zip(made, per_job, strict=True):
        job.items_total = count * 10
    Job.objects.bulk_update(made, ["items_total"], batch_size=2000)
    return made


def analyze() -> None:
    """Bring the planner's statistics up to date, as autovacuum does within a minute of a bulk change
    on a serving database. Without it, a phase ran on plans made for whatever the table held when
    autovacuum last woke (an empty task table, or 100,000 queued tasks after they were done): at
    `--rate 560`, the half-load p99 was 1,364 and 1,410 ms without, 135 and 206 ms with."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")


def hosts_answer() -> int:
    """The simulated hosts finish everything they hold (not part of any timing)."""
    from django.utils import timezone

    from marketplace.jobs.models import Task
    from marketplace.jobs.states import TaskStatus

    return Task.objects.filter(status=TaskStatus.LEASED).update(
        status=TaskStatus.SUCCEEDED, completed_at=timezone.now()
    )


def hosts_read_messages() -> None:
    """The simulated hosts' sockets read the `task.assign` messages the rounds sent them (not part of
    any timing). The in-memory channel layer of the process that runs the rounds (no REDIS_URL, as
    here) keeps each host's channel until a consumer reads it: with none reading, the messages and a
    queue for each host addressed piled up in that process for its collector to walk (see
    `_untracked_id`)."""
    from channels.layers import InMemoryChannelLayer, get_channel_layer

    layer = get_channel_layer()
    if isinstance(layer, InMemoryChannelLayer):
        layer.channels.clear()  # its sends have finished: they run to the end on commit


def hosts_report_power() -> None:
    """The simulated hosts send a power frame, as live agents do every HEARTH_POWER_INTERVAL_S: a
    reading goes stale after three intervals, and green-only work waits for a fresh one."""
    from django.utils import timezone

    from marketplace.hosts.models import Host

    Host.objects.update(power_at=timezone.now())


def naive_claims(*, tasks: int) -> tuple[int, float]:
    """One task per transaction: lock any queued task, lease it to the next host. No fairness,
    filters or scores, so the cheapest one-at-a-time claim there is: generous to the baseline."""
    from django.conf import settings
    from django.db import connection, transaction
    from django.db.models import F
    from django.utils import timezone

    from marketplace.hosts.models import Host
    from marketplace.jobs.models import Task
    from marketplace.jobs.states import TaskStatus

    hosts = list(Host.objects.filter(status=Host.Status.ONLINE).values_list("pk", flat=True))
    skip_locked = connection.features.has_select_for_update_skip_locked
    done = 0
    started = time.perf_counter()
    for n in range(tasks):
        now = timezone.now()
        with transaction.atomic():
            picked = Task.objects.filter(status=TaskStatus.QUEUED).order_by()
            if skip_locked:
                picked = picked.select_for_update(skip_locked=True)
            task_id = picked.values_list("pk", flat=True).first()
            if task_id is None:
                break
            done += Task.objects.filter(pk=task_id, status=TaskStatus.QUEUED).update(
                status=TaskStatus.LEASED,
                lease_id=uuid.uuid4(),
                leased_to_id=hosts[n % len(hosts)],
                lease_expires_at=now + timedelta(seconds=settings.HEARTH_LEASE_SECONDS),
                assigned_at=now,
                attempt=F("attempt") + 1,
            )
    return done, time.perf_counter() - started


def sustained(*, limit: int) -> dict[str, Any]:
    """Batch rounds until nothing is left that a host can take; the hosts answer between rounds."""
    from marketplace.matching.services import tasks_claim_batch

    assigned: list[int] = []  # task ids as ints: see `_untracked_id`
    in_rounds = 0.0
    rounds = 0
    while True:
        started = time.perf_counter()
        got = tasks_claim_batch(limit=limit)
        in_rounds += time.perf_counter() - started
        rounds += 1
        leased = [_untracked_id(a.task_id) for assignments in got.values() for a in assignments]
        if not leased:
            break
        assigned.extend(leased)
        hosts_read_messages()
        hosts_answer()
        hosts_report_power()
    return {"assigned": assigned, "seconds": in_rounds, "rounds": rounds}


def half_load(*, model: Any, buyers: list[Any], rate: float, seconds: float, limit: int) -> dict[str, Any]:
    """Rounds back to back on this thread, as a dispatcher process runs them, while another process
    (the buyers through the API, the hosts through their sockets) submits tasks on a schedule at
    `rate` per second for `seconds` and finishes what the hosts hold. A task's latency is the end
    of the round that leased it minus its scheduled submit time (both `time.perf_counter()`, one
    monotonic clock for every process on the machine)."""
    from django.db import connections

    from marketplace.jobs.models import Job
    from marketplace.matching.services import tasks_claim_batch

    jobs = Job.objects.bulk_create(
        Job(buyer=buyer, model=model, task_size=10, items_total=0, max_price_per_1k_minor=100)
        for buyer in buyers[:20]
    )
    connections.close_all()  # the other process opens its own; a forked socket would be shared
    ours, theirs = mp.get_context("fork").Pipe()
    start = time.perf_counter() + 0.5
    side = mp.get_context("fork").Process(
        target=_buyers_and_hosts, args=(theirs, [job.pk for job in jobs], start, rate, seconds)
    )
    side.start()
    leased_at: dict[int, float] = {}  # task id (`_untracked_id`) → when the round that leased it ended
    round_ms: list[float] = []
    submitted: dict[int, tuple[float, float]] | None = None
    while True:
        began = time.perf_counter()
        got = tasks_claim_batch(limit=limit)
        ended = time.perf_counter()
        if ended >= start:
            round_ms.append((ended - began) * 1000)
        for assignments in got.values():
            leased_at.update((_untracked_id(a.task_id), ended) for a in assignments)
        hosts_read_messages()
        if submitted is None and ours.poll():
            submitted = ours.recv()  # the schedule is over
        if submitted is not None and not got and all(task in leased_at for task in submitted):
            break
        if submitted is not None and not got and time.perf_counter() - start > seconds + 10:
            break  # what is left no host can take
    ours.send("stop")
    side.join()
    assert submitted is not None
    latencies_ms = sorted(
        (leased_at[task] - due) * 1000 for task, (due, _) in submitted.items() if task in leased_at
    )
    from_insert_ms = sorted(
        (leased_at[task] - inserted) * 1000 for task, (_, inserted) in submitted.items() if task in leased_at
    )
    round_ms.sort()
    return {
        "rate": rate,
        "submitted": len(submitted),
        "latencies_ms": latencies_ms,
        "from_insert_ms": from_insert_ms,
        "round_ms": round_ms,
    }


def _buyers_and_hosts(pipe: Any, job_ids: list[uuid.UUID], start: float, rate: float, seconds: float) -> None:
    """The dispatcher's counterparts, in their own process: submit on schedule (each task stamped with
    the instant the schedule says it was submitted, however late the insert ran), send the stamps
    back, and let the hosts answer every 50 ms until the dispatcher says stop. (No power frames:
    none of these jobs is green-only.)"""
    from django.db import connections

    from marketplace.jobs.models import Job, Task

    jobs = list(Job.objects.filter(pk__in=job_ids))
    inputs = [f"item {n}" for n in range(10)]
    submitted: dict[int, tuple[float, float]] = {}  # task → (due on schedule, insert committed)
    made = 0
    answered = start
    while (now := time.perf_counter()) < start + seconds:
        due = min(int(max(0.0, now - start) * rate), int(seconds * rate)) - made
        if due > 0:
            batch = []
            for k in range(made, made + due):
                task = Task(job=jobs[k % len(jobs)], index=k, first_item=k * 10, inputs=inputs, item_count=10)
                task.billable, task.group = True, task.pk
                batch.append(task)
            Task.objects.bulk_create(batch)
            inserted = time.perf_counter()
            for k, task in enumerate(batch, start=made):
                # When the buyer submitted it, on schedule; when its insert committed.
                submitted[_untracked_id(task.pk)] = (start + k / rate, inserted)
            made += due
        if now - answered >= 0.05:
            hosts_answer()
            answered = now
        time.sleep(0.001)
    pipe.send(submitted)
    # The hosts go on finishing what they hold until the dispatcher has leased the last task: a
    # task submitted late may wait for a slot that only an answer frees.
    while not pipe.poll(0.05):
        hosts_answer()
    connections.close_all()


RESTRICTED_REGION = "ap-south"


def restricted_bursts(*, model: Any, buyer: Any, bursts: int, size: int, limit: int) -> dict[str, Any]:
    """`bursts` bursts of up to `size` tasks for a job that only `RESTRICTED_REGION`'s hosts may take,
    one at a time: each is inserted, then rounds run back to back until none of it is queued (at most
    50 rounds); the hosts answer between bursts. A burst is at most half of what the region's hosts
    that fit the model can hold, so every burst fits."""
    from django.db.models import Sum

    from marketplace.hosts.models import Host
    from marketplace.jobs.models import Job, Task
    from marketplace.jobs.states import TaskStatus
    from marketplace.matching.services import tasks_claim_batch

    hosts_answer()
    region_slots = (
        Host.objects.filter(region=RESTRICTED_REGION, memory_mb__gte=model.min_memory_mb).aggregate(
            n=Sum("slots")
        )["n"]
        or 0
    )
    size = min(size, region_slots // 2)
    job = Job.objects.create(
        buyer=buyer,
        model=model,
        task_size=10,
        items_total=0,
        max_price_per_1k_minor=100,
        region=RESTRICTED_REGION,
    )
    rounds: list[int] = []
    burst_ms: list[float] = []
    placed = 0
    for burst in range(bursts if size else 0):
        tasks = []
        for k in range(burst * size, (burst + 1) * size):
            task = Task(job=job, index=k, first_item=k * 10, inputs=["item"] * 10, item_count=10)
            task.billable, task.group = True, task.pk
            tasks.append(task)
        began = time.perf_counter()
        Task.objects.bulk_create(tasks)
        waiting = Task.objects.filter(job=job, status=TaskStatus.QUEUED)
        n = 0
        while n < 50 and waiting.exists():
            tasks_claim_batch(limit=limit)
            n += 1
        burst_ms.append((time.perf_counter() - began) * 1000)
        rounds.append(n)
        hosts_read_messages()
        placed += (
            Task.objects.filter(pk__in=[task.pk for task in tasks]).exclude(status=TaskStatus.QUEUED).count()
        )
        hosts_answer()
    burst_ms.sort()
    return {
        "restricted_bursts": len(rounds),
        "restricted_burst_tasks": size,
        "restricted_submitted": size * len(rounds),
        "restricted_placed": placed,
        "restricted_rounds_mean": round(sum(rounds) / len(rounds), 2) if rounds else None,
        "restricted_rounds_max": max(rounds, default=None),
        "restricted_burst_p50_ms": round(_percentile(burst_ms, 0.50), 2),
        "restricted_burst_p99_ms": round(_percentile(burst_ms, 0.99), 2),
    }


def _untracked_id(task_id: uuid.UUID) -> int:
    """A task id as the bench keeps it: an int, which the garbage collector does not track (a UUID it
    does). The bench's own records are not the dispatcher's work: kept as UUIDs, together with the
    messages no simulated host read (`hosts_read_messages`), they filled the young generation of the
    process that runs the rounds, and a young collection stopped a round at half load (two in 10 s,
    of 41 and 18 ms; with the records as ints but the messages kept, one of 43 ms; with neither, none).
    """
    return task_id.int


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    return values[min(len(values) - 1, int(q * len(values)))]


def run(
    *,
    hosts: int,
    tasks: int,
    buyers: int,
    jobs: int,
    limit: int,
    baseline_tasks: int,
    latency_s: float,
    rate: float | None = None,
    restricted_bursts_n: int = 20,
    seed: int = 7,
) -> dict[str, Any]:
    """The whole benchmark on the database Django points at; the figures as one dict."""
    from django.test import override_settings

    from marketplace.jobs.models import Task

    rng = random.Random(seed)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    model, made_buyers = seed_fleet(hosts=hosts, buyers=buyers, rng=rng)
    seed_tasks(model=model, buyers=made_buyers, tasks=tasks, jobs=jobs, rng=rng)
    analyze()
    timings["seed_s"] = time.perf_counter() - started

    baseline_done, baseline_s = naive_claims(tasks=baseline_tasks)
    hosts_answer()
    # The bench has no canary bank; with none, a canary attempt costs one query and leases nothing.
    with override_settings(HEARTH_CANARY_RATE_MIN=0.0, HEARTH_CANARY_RATE_MAX=0.0):
        batch = sustained(limit=limit)
        analyze()
        tasks_per_s = len(batch["assigned"]) / batch["seconds"] if batch["seconds"] else 0.0
        load = half_load(
            model=model,
            buyers=made_buyers,
            rate=rate or max(1.0, tasks_per_s / 2),
            seconds=latency_s,
            limit=limit,
        )
        restricted = restricted_bursts(
            model=model, buyer=made_buyers[0], bursts=restricted_bursts_n, size=40, limit=limit
        )
    latencies = load["latencies_ms"]
    baseline_per_s = baseline_done / baseline_s if baseline_s else 0.0
    assigned_once = len(batch["assigned"]) == len(set(batch["assigned"]))
    return {
        "tasks_per_s": round(tasks_per_s, 1),
        "p50_assign_ms": round(_percentile(latencies, 0.50), 2),
        "p99_assign_ms": round(_percentile(latencies, 0.99), 2),
        "baseline_tasks_per_s": round(baseline_per_s, 1),
        "ratio_vs_baseline": round(tasks_per_s / baseline_per_s, 2) if baseline_per_s else None,
        "ratio_vs_boinc": round(tasks_per_s / BOINC_TASKS_PER_S, 2),
        "hosts": hosts,
        "tasks": tasks,
        "buyers": buyers,
        "jobs": jobs,
        "round_limit": limit,
        "rounds": batch["rounds"],
        "batch_assigned": len(batch["assigned"]),
        "batch_seconds": round(batch["seconds"], 2),
        "baseline_assigned": baseline_done,
        "assigned_once": assigned_once,
        "half_load_rate": round(load["rate"], 1),
        "half_load_submitted": load["submitted"],
        "half_load_assigned": len(latencies),
        "insert_to_assign_p50_ms": round(_percentile(load["from_insert_ms"], 0.50), 2),
        "insert_to_assign_p99_ms": round(_percentile(load["from_insert_ms"], 0.99), 2),
        "half_load_rounds": len(load["round_ms"]),
        "half_load_round_p50_ms": round(_percentile(load["round_ms"], 0.50), 2),
        "half_load_round_p99_ms": round(_percentile(load["round_ms"], 0.99), 2),
        **restricted,
        "left_queued": Task.objects.filter(status="queued").count(),
        "seed_s": round(timings["seed_s"], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hosts", type=positive_int, default=10_000)
    parser.add_argument("--tasks", type=positive_int, default=100_000)
    parser.add_argument("--buyers", type=positive_int, default=200)
    parser.add_argument("--jobs", type=positive_int, default=1000)
    parser.add_argument(
        "--limit", type=positive_int, default=20_000, help="tasks a batch round leases at most"
    )
    parser.add_argument("--baseline-tasks", type=positive_int, default=3000)
    parser.add_argument("--latency-s", type=positive_float, default=10.0)
    parser.add_argument(
        "--bursts",
        type=positive_int,
        default=20,
        help=f"bursts of work only {RESTRICTED_REGION}'s hosts take",
    )
    parser.add_argument(
        "--rate",
        type=positive_float,
        help="tasks/s submitted in the latency phase (default: half the sustained rate)",
    )
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from marketplace.config.gc_tuning import collect_young_after

    collect_young_after()  # this process runs the rounds, as the Celery worker does: tuned as it is

    from bench._pg import bench_database, setup_django

    with bench_database() as database:
        setup_django(database)
        figures = run(
            hosts=args.hosts,
            tasks=args.tasks,
            buyers=args.buyers,
            jobs=args.jobs,
            limit=args.limit,
            baseline_tasks=args.baseline_tasks,
            latency_s=args.latency_s,
            rate=args.rate,
            restricted_bursts_n=args.bursts,
        )
    for key, value in figures.items():
        print(f"{key:24}{value}", file=sys.stderr)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
