"""Verification at the service level: replicas, comparison by tolerance, tie-breaks on trusted hosts,
canaries, strikes, quarantine and the score — with vectors made to order, no agents."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import numpy as np
import pytest
import time_machine
from django.test import override_settings
from django.utils import timezone

from hearth_agent import protocol
from marketplace.hosts.models import Host
from marketplace.jobs.models import Task
from marketplace.jobs.selectors import job_summary
from marketplace.jobs.services import (
    leases_renew,
    leases_requeue_expired,
    task_result_accept,
)
from marketplace.trust.models import CanaryItem, ReliabilityEvent, Strike
from marketplace.trust.selectors import host_reliability
from tests import fake_runs as fr
from tests.fake_runs import cheat_random, honest

pytestmark = pytest.mark.django_db


def test_redundant_runs_on_two_honest_hosts_agree_despite_rounding_and_nobody_gets_a_strike(
    buyer: Any, catalog: Any
) -> None:
    a, b = fr.host(), fr.host()
    job = fr.job(buyer, n=4, task_size=2, verification="redundant", replicas=2)
    assert Task.objects.filter(job=job).count() == 4  # 2 tasks × 2 runs
    while fr.run(a) + fr.run(b):
        pass
    job.refresh_from_db()
    assert job.status == "succeeded"
    assert Strike.objects.count() == 0
    runs = Task.objects.filter(job=job)
    assert set(runs.values_list("verdict", flat=True)) == {"passed"}
    # Each task's two runs went to two different hosts.
    for group in runs.values_list("group", flat=True).distinct():
        assert len({t.completed_by_id for t in runs.filter(group=group)}) == 2
    assert np.allclose(fr.served(job), fr.expected(job), atol=1e-3)
    assert job_summary(job=job)["verification"]["runs_passed"] == 4


def test_a_cheater_in_a_redundant_job_is_outvoted_by_a_trusted_tie_break_and_the_buyer_gets_the_truth(
    buyer: Any, catalog: Any
) -> None:
    honest_host, cheater = fr.host(), fr.host()
    job = fr.job(buyer, n=2, task_size=2, verification="redundant", replicas=2)
    fr.run(honest_host)
    fr.run(cheater, answer=cheat_random)
    tie_break = Task.objects.get(job=job, needs_trusted=True)
    assert "cosine" in tie_break.last_error
    assert fr.claim(honest_host) == []  # it already ran this group
    assert fr.claim(cheater) == []
    job.refresh_from_db()
    assert job.status == "running" and job.items_done == 0  # nothing known-wrong is served meanwhile
    referee = fr.host()
    assert fr.run(referee) == 1
    job.refresh_from_db()
    assert job.status == "succeeded"
    verdicts = {t.completed_by_id: t.verdict for t in Task.objects.filter(job=job)}
    assert verdicts == {honest_host.pk: "passed", cheater.pk: "failed", referee.pk: "passed"}
    strike = Strike.objects.get()
    assert (strike.host_id, strike.kind) == (cheater.pk, "mismatch")
    assert "cosine" in strike.evidence and str(strike.task_id) in strike.evidence
    assert np.allclose(fr.served(job), fr.expected(job), atol=1e-3)
    cheater.refresh_from_db()
    assert cheater.reliability < 0.85 and cheater.checks_failed == 1
    assert "strike" in ReliabilityEvent.objects.filter(host=cheater).first().reason  # type: ignore[union-attr]


def test_a_tie_break_waits_for_a_trusted_host_and_an_untrusted_one_cannot_take_it(
    buyer: Any, catalog: Any
) -> None:
    a, b = fr.host(), fr.host()
    fr.job(buyer, n=2, task_size=2, verification="redundant", replicas=2)
    fr.run(a)
    fr.run(b, answer=cheat_random)
    newcomer = fr.host(reliability=0.5)  # verified, but not yet trusted
    assert fr.claim(newcomer) == []
    assert Task.objects.get(needs_trusted=True).status == "queued"


def test_spot_checks_re_run_the_sampled_tasks_on_another_host(buyer: Any, catalog: Any) -> None:
    a, b = fr.host(), fr.host()
    job = fr.job(buyer, n=8, task_size=2, verification="spot", spot_fraction=1.0)
    assert Task.objects.filter(job=job, role="replica").count() == 4
    while fr.run(a) + fr.run(b):
        pass
    job.refresh_from_db()
    assert job.status == "succeeded"
    assert job_summary(job=job)["tasks"]["succeeded"] == 4  # the buyer's tasks, not the replicas


def test_without_verification_a_result_is_accepted_unchecked(buyer: Any, catalog: Any, host: Any) -> None:
    job = fr.job(buyer, n=2, task_size=2)
    fr.run(host, answer=cheat_random)
    job.refresh_from_db()
    assert job.status == "succeeded"
    assert Task.objects.get(job=job).verdict == "unchecked"


@pytest.fixture
def bank(catalog: Any) -> list[CanaryItem]:
    return fr.canary_bank(catalog)


@override_settings(HEARTH_CANARIES_TO_VERIFY=3)
def test_a_new_host_gets_only_known_answer_tasks_until_it_passes_enough_of_them(
    buyer: Any, bank: Any
) -> None:
    job = fr.job(buyer, n=4, task_size=2)
    newcomer = fr.host(verified_at=None, reliability=0.5)
    for passed in range(3):
        assignments = fr.claim(newcomer)
        assert len(assignments) == 1  # one at a time, though it has two slots
        task = Task.objects.get(pk=assignments[0].task_id)
        assert task.role == "canary" and task.job_id != job.pk
        assert len(assignments[0].inputs) == 2  # shaped like the queued work
        assert fr.claim(newcomer) == []
        _payload_ok = fr.payload(assignments[0], honest(assignments[0].inputs))
        assert task_result_accept(host_id=newcomer.pk, payload=_payload_ok).accepted
        newcomer.refresh_from_db()
        assert (newcomer.verified_at is not None) == (passed == 2)
    with override_settings(HEARTH_CANARY_RATE_MAX=0.0, HEARTH_CANARY_RATE_MIN=0.0):
        assert {Task.objects.get(pk=a.task_id).job_id for a in fr.claim(newcomer)} == {job.pk}
    assert "verified" in ReliabilityEvent.objects.filter(host=newcomer).first().reason  # type: ignore[union-attr]


@override_settings(HEARTH_STRIKES_TO_QUARANTINE=3)
def test_wrong_answers_to_known_answer_tasks_are_strikes_and_three_quarantine_the_host(
    buyer: Any, bank: Any
) -> None:
    fr.job(buyer, n=4, task_size=2)
    cheater = fr.host(verified_at=None, reliability=0.5)
    for _ in range(3):
        assert fr.run(cheater, answer=cheat_random) == 1
    cheater.refresh_from_db()
    assert cheater.verified_at is None
    assert cheater.quarantined_at is not None and cheater.earnings_withheld
    assert "3 strikes" in cheater.quarantine_reason
    assert list(Strike.objects.filter(host=cheater).values_list("kind", flat=True)) == ["canary"] * 3
    assert "known-answer" in Strike.objects.filter(host=cheater).first().evidence  # type: ignore[union-attr]
    assert fr.claim(cheater) == []


def test_a_verified_host_gets_canaries_mixed_in_less_often_as_its_streak_grows(buyer: Any, bank: Any) -> None:
    fr.job(buyer, n=400, task_size=1)
    fresh, seasoned = fr.host(slots=1, pass_streak=0), fr.host(slots=1, pass_streak=40)

    def canaries(host: Host, rounds: int = 60) -> int:
        count = 0
        for _ in range(rounds):
            for assignment in fr.claim(host):
                task = Task.objects.get(pk=assignment.task_id)
                count += task.role == "canary"
                Task.objects.filter(pk=task.pk).update(status="cancelled")  # free the slot, no verdict
        return count

    with override_settings(HEARTH_CANARY_RATE_MIN=0.0):
        assert canaries(fresh) > 10  # ~0.5 of 60
        assert canaries(seasoned) <= 3  # 0.5 × 0.5^8 ≈ 0.002


def test_a_host_that_holds_a_task_and_never_answers_loses_it_at_the_runtime_cap_with_a_strike(
    buyer: Any, catalog: Any, host: Any
) -> None:
    fr.job(buyer, n=2, task_size=2)
    assignment = fr.claim(host)[0]
    start = timezone.now()
    with override_settings(HEARTH_TASK_MAX_RUNTIME_S=30, HEARTH_LEASE_SECONDS=20):
        for seconds in (10, 20, 29):
            with time_machine.travel(start + timedelta(seconds=seconds), tick=False):
                leases_renew(host_id=host.pk, lease_ids=[str(assignment.lease_id)], now=timezone.now())
        task = Task.objects.get(pk=assignment.task_id)
        assert task.lease_expires_at is not None and task.assigned_at is not None
        assert task.lease_expires_at <= task.assigned_at + timedelta(seconds=30)
        assert leases_requeue_expired(now=start + timedelta(seconds=31)) == 1
    strike = Strike.objects.get(host=host)
    assert strike.kind == "no_answer" and "never answered" in strike.evidence
    host.refresh_from_db()
    assert host.leases_expired == 1


def test_a_trusted_host_that_turned_cannot_decide_a_tie_break_alone(buyer: Any, catalog: Any) -> None:
    a, b, turned, referee = fr.host(), fr.host(), fr.host(), fr.host()
    job = fr.job(buyer, n=1, task_size=1, verification="redundant", replicas=2)
    fr.run(a)
    fr.run(b, answer=cheat_random)
    assert fr.run(turned, answer=cheat_random) == 1  # takes the tie-break and lies
    job.refresh_from_db()
    assert job.status == "running"  # three runs, no two agree: one more
    assert Task.objects.filter(job=job, needs_trusted=True).count() == 2
    assert fr.run(referee) == 1
    job.refresh_from_db()
    assert job.status == "succeeded"
    assert set(Strike.objects.values_list("host_id", flat=True)) == {b.pk, turned.pk}
    assert np.allclose(fr.served(job), fr.expected(job), atol=1e-3)


def test_a_strike_reopens_the_hosts_unchecked_results_in_running_jobs(buyer: Any, catalog: Any) -> None:
    cheater, other = fr.host(slots=2), fr.host()
    job = fr.job(buyer, n=4, task_size=1)  # no verification asked
    fr.run(cheater, answer=cheat_random)  # two tasks, accepted unchecked
    job.refresh_from_db()
    assert job.items_done == 2
    from marketplace.trust.services import strike

    strike(host_id=cheater.pk, kind="canary", evidence="failed a known-answer task")
    job.refresh_from_db()
    assert job.items_done == 0  # its two results are no longer final
    assert Task.objects.filter(job=job, role="replica").count() == 2
    with override_settings(HEARTH_CANARY_RATE_MAX=0.0, HEARTH_CANARY_RATE_MIN=0.0):
        while fr.run(other):
            pass
        fr.run(fr.host(slots=4))
    job.refresh_from_db()
    assert job.status == "succeeded"
    assert np.allclose(fr.served(job), fr.expected(job), atol=1e-3)
    assert Task.objects.filter(job=job, completed_by=cheater, verdict="failed").count() == 2


def test_hosts_with_old_numbers_are_asked_to_benchmark_again_and_others_only_at_random(catalog: Any) -> None:
    from asgiref.sync import async_to_sync
    from channels.layers import get_channel_layer

    from marketplace.trust.services import hosts_request_benchmark

    layer = get_channel_layer()
    assert layer is not None
    stale_channel = async_to_sync(layer.new_channel)()
    fresh_channel = async_to_sync(layer.new_channel)()
    now = timezone.now()
    stale = fr.host(channel_name=stale_channel, benchmark_at=now - timedelta(days=2))
    fr.host(channel_name=fresh_channel, benchmark_at=now - timedelta(minutes=5))
    with override_settings(HEARTH_REBENCHMARK_S=86400, HEARTH_REBENCHMARK_RANDOM_MEAN_S=10**9):
        assert hosts_request_benchmark(now=now) == 1
        assert hosts_request_benchmark(now=now) == 0  # not asked twice in a row
    message = async_to_sync(layer.receive)(stale_channel)
    assert message == {"type": "agent.benchmark", "reason": "periodic re-benchmark"}
    stale.refresh_from_db()
    assert stale.benchmark_requested_at == now
    # With a random mean far below the sweep interval, every fresh host is picked too.
    with override_settings(HEARTH_REBENCHMARK_RANDOM_MEAN_S=0.001):
        assert hosts_request_benchmark(now=now + timedelta(hours=1)) == 2
    assert async_to_sync(layer.receive)(fresh_channel)["reason"] == "random re-benchmark"


def test_a_benchmark_that_does_not_fit_the_claimed_gpu_is_a_strike_and_stops_all_work(
    buyer: Any, catalog: Any
) -> None:
    from marketplace.trust.services import host_benchmark_record

    liar = fr.host(
        device="cuda", capabilities={"gpus": [{"name": "NVIDIA GeForce RTX 4090", "memory_mb": 24576}]}
    )
    report = protocol.BenchmarkReport(
        key="k1", measured_at="now", device="cuda", device_name="NVIDIA GeForce RTX 4090", cpu_count=2,
        matmul_fp32_gflops=41.0, memory_bandwidth_gbs=9.0, max_alloc_mb=2048,
    )  # fmt: skip
    assert host_benchmark_record(host_id=liar.pk, report=report) is False
    assert host_benchmark_record(host_id=liar.pk, report=report) is False  # the same report again
    strikes = list(Strike.objects.filter(host=liar))
    assert [s.kind for s in strikes] == ["hardware"]  # one strike per distinct report, not per reconnect
    assert "RTX 4090" in strikes[0].evidence and "41 GFLOP/s" in strikes[0].evidence
    fr.job(buyer)
    assert fr.claim(liar) == []


def test_a_quarantined_hosts_owner_keeps_pending_earnings_out_of_the_next_sweep(catalog: Any) -> None:
    from marketplace.trust.selectors import owners_with_withheld_earnings
    from marketplace.trust.services import quarantine

    honest, quarantined = fr.host(), fr.host()
    assert quarantine(host_id=quarantined.pk, reason="3 strikes")
    assert owners_with_withheld_earnings() == frozenset({quarantined.owner_id})
    assert honest.owner_id not in owners_with_withheld_earnings()


def test_a_reliability_report_that_shows_a_no_answer_strike_also_counts_the_expired_lease(
    buyer: Any, catalog: Any, host: Any
) -> None:
    fr.job(buyer, n=2, task_size=2)
    fr.claim(host)
    loaded_before_the_sweep = Host.objects.get(pk=host.pk)  # as a view loads it, then a sweep runs
    assert leases_requeue_expired(now=timezone.now() + timedelta(days=1)) == 1
    report = host_reliability(host=loaded_before_the_sweep)
    assert [s["kind"] for s in report["strikes"]] == ["no_answer"]
    assert report["counts"]["leases_expired"] == 1
