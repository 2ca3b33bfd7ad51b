"""Verification under attack: a simulated fleet with a known share of cheaters of each kind runs
many tasks through the real claim / result / verification services (in-process, a throwaway SQLite
database), at `redundant` and `spot` levels, next to the baseline of no verification.

Hosts are simulated (no sockets, no model): honest ones answer with the true vectors plus fp32- or
bf16-sized rounding noise; cheaters answer with random vectors, one constant vector, a cheaper
model's vectors (cosine ~0.5 to the truth, as 3 of MiniLM's 6 layers measure) or another task's
vectors. Everything else — which runs exist, who may claim what, comparison, tie-breaks, strikes,
quarantine, canaries — is the project's code.

Figures: detection rates (redundant: share of cheated results caught; spot: share of cheaters
caught within their first n tasks, next to 1-(1-f)^n), the false positive rate over honest runs,
wrong results delivered to buyers, and the verification overhead (extra compute ÷ useful compute).

    python -m bench.trust [--hosts 24] [--cheaters 0.25] [--tasks 300] [--spot-f 0.1] [--spot-n 15]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from typing import Any

import numpy as np

DIM = 384
KINDS = ("random", "constant", "cheaper", "copy")


def _setup_django(db_path: str) -> None:
    os.environ.pop("DATABASE_URL", None)
    os.environ.pop("REDIS_URL", None)
    os.environ["HEARTH_SQLITE_PATH"] = db_path
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.config.settings")
    import django
    from django.conf import settings

    django.setup()
    settings.CHANNEL_LAYERS = {}  # no sockets here: nothing to notify
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


class Truth:
    """The model the fleet is supposed to run: a fixed unit vector per input text."""

    def __init__(self) -> None:
        self.vectors: dict[str, np.ndarray] = {}
        self.rng = np.random.default_rng(7)

    def __call__(self, text: str) -> np.ndarray:
        if text not in self.vectors:
            v = self.rng.normal(size=DIM)
            self.vectors[text] = (v / np.linalg.norm(v)).astype("<f4")
        return self.vectors[text]


TRUTH = Truth()


class SimHost:
    def __init__(self, host: Any, kind: str, truth: Truth, rng: np.random.Generator) -> None:
        self.host, self.kind, self.truth, self.rng = host, kind, truth, rng
        self.constant = rng.normal(size=DIM).astype("<f4")
        self.last: np.ndarray | None = None
        # bf16 rounding gives per-item cosine ~0.99985 (measured on MiniLM); fp32 kernels ~1e-7 apart.
        self.noise = 0.017 if kind == "honest_bf16" else 1e-4
        self.wrong: set[str] = set()  # task ids it answered wrongly (copy's first answer is right)

    @property
    def honest(self) -> bool:
        return self.kind.startswith("honest")

    def answer(self, inputs: list[str]) -> np.ndarray:
        true = np.stack([self.truth(t) for t in inputs])
        if self.honest:
            return (true + self.rng.normal(scale=self.noise / np.sqrt(DIM), size=true.shape)).astype("<f4")
        if self.kind == "random":
            return self.rng.normal(size=true.shape).astype("<f4")
        if self.kind == "constant":
            return np.tile(self.constant, (len(inputs), 1))
        if self.kind == "cheaper":
            other = self.rng.normal(size=true.shape)
            other /= np.linalg.norm(other, axis=1, keepdims=True)
            return (0.5 * true + 0.85 * other).astype("<f4")
        # copy: the previous task's vectors, whatever this task asked
        out = self.last if self.last is not None else true
        self.last = true
        return np.resize(out, true.shape).astype("<f4")


def _fleet(n_hosts: int, cheater_share: float, truth: Truth, seed: int) -> list[SimHost]:
    from django.utils import timezone

    from marketplace.accounts.models import User
    from marketplace.accounts.tokens import secret_issue
    from marketplace.hosts.models import Host
    from marketplace.trust.models import HostSession

    rng = np.random.default_rng(seed)
    owner = User.objects.create(username=f"owner-{seed}", email=f"owner-{seed}@bench.local", role="host")
    n_cheaters = round(n_hosts * cheater_share)
    kinds = [KINDS[i % len(KINDS)] for i in range(n_cheaters)]
    kinds += ["honest_fp32" if i % 2 else "honest_bf16" for i in range(n_hosts - n_cheaters)]
    hosts = []
    for i, kind in enumerate(kinds):
        host = Host.objects.create(
            owner=owner,
            name=f"{kind}-{seed}-{i}",
            token_prefix="ht_bench",
            token_digest=secret_issue("ht").digest,
            status=Host.Status.ONLINE,
            ready=True,
            channel_name=f"bench.{seed}.{i}",
            slots=1,
            memory_mb=8192,
            device="cpu",
            # Every host starts verified and trusted (cheaters who behaved until now), so what is
            # measured is the job-level checking.
            verified_at=timezone.now(),
            hardware_ok=True,
            reliability=0.9,
            pass_streak=40,
        )
        # Connected since it enrolled (its uptime counts towards its score, as a live agent's would).
        HostSession.objects.create(host=host, channel_name=host.channel_name, started_at=host.created_at)
        hosts.append(SimHost(host, kind, truth, rng))
    return hosts


def _drive(fleet: list[SimHost], job_ids: list[uuid.UUID], rng: np.random.Generator) -> dict[str, int]:
    """Rounds of: every host (in random order) claims and answers, until the jobs are done."""
    from hearth_agent import protocol
    from marketplace.jobs.models import Job, Task
    from marketplace.jobs.services import task_result_accept
    from marketplace.matching.services import tasks_claim_for_host

    compute: Counter[str] = Counter()
    idle_rounds = 0
    while Job.objects.filter(pk__in=job_ids, status__in=["queued", "running"]).exists() and idle_rounds < 3:
        worked = 0
        for sim in rng.permutation(np.array(fleet, dtype=object)):
            for a in tasks_claim_for_host(host_id=sim.host.pk, channel_name=sim.host.channel_name):
                vectors = sim.answer(a.inputs)
                true = np.stack([sim.truth(t) for t in a.inputs])
                cosines = (vectors * true).sum(1) / np.linalg.norm(vectors, axis=1)
                if cosines.min() < 0.99:
                    sim.wrong.add(str(a.task_id))
                b64, digest = protocol.encode_embeddings(vectors.tobytes())
                payload = protocol.TaskResultPayload(
                    task_id=str(a.task_id), lease_id=str(a.lease_id), dimension=DIM, count=len(vectors),
                    embeddings_b64=b64, output_sha256=digest, compute_ms=1.0, device="cpu",
                )  # fmt: skip
                task_result_accept(host_id=sim.host.pk, payload=payload)
                role = Task.objects.filter(pk=a.task_id).values_list("role", "needs_trusted").first()
                compute["tie_break" if role and role[1] else (role[0] if role else "?")] += len(a.inputs)
                worked += 1
        idle_rounds = 0 if worked else idle_rounds + 1
    return dict(compute)


def _job(buyer: Any, model_name: str, n_tasks: int, **verification: Any) -> uuid.UUID:
    from marketplace.jobs.services import check_job_spec, job_submit

    inputs = [f"bench {uuid.uuid4().hex[:12]}" for _ in range(n_tasks)]
    spec = check_job_spec(model_name=model_name, inputs=inputs, task_size=1, **verification)
    return job_submit(buyer=buyer, spec=spec).pk


def _delivered_wrong(job_id: uuid.UUID, truth: Truth, min_cosine: float) -> tuple[int, int]:
    from marketplace.jobs.models import Task

    wrong = total = 0
    for task in Task.objects.filter(job_id=job_id, role="primary", settled=True):
        got = np.frombuffer(bytes(task.output), dtype="<f4").reshape(task.item_count, DIM)
        for text, vector in zip(task.inputs, got, strict=True):
            total += 1
            wrong += float(vector @ truth(text) / np.linalg.norm(vector)) < min_cosine
    return wrong, total


def _runs_by_kind(job_ids: list[uuid.UUID], fleet: list[SimHost]) -> dict[str, Counter[str]]:
    """Verdicts per kind of host; a cheater's runs count as cheated only where its answer was wrong."""
    from marketplace.jobs.models import Task

    sims = {sim.host.pk: sim for sim in fleet}
    out: dict[str, Counter[str]] = defaultdict(Counter)
    for task_id, host_id, verdict in Task.objects.filter(
        job_id__in=job_ids, completed_by__isnull=False
    ).values_list("pk", "completed_by_id", "verdict"):
        sim = sims[host_id]
        kind = sim.kind if sim.honest or str(task_id) in sim.wrong else "honest_answer_from_cheater"
        out[kind][verdict] += 1
    return out


def scenario(
    name: str, *, hosts: int, cheaters: float, tasks: int, seed: int, canaries: bool, **verification: Any
) -> dict[str, Any]:
    from django.conf import settings
    from django.test import override_settings

    from marketplace.accounts.models import User
    from marketplace.billing.services import credit_grant
    from marketplace.catalog.models import CatalogModel
    from marketplace.trust.models import Strike

    truth = TRUTH
    rng = np.random.default_rng(seed)
    model = CatalogModel.objects.get(name="all-MiniLM-L6-v2")
    _bank(model, truth)
    fleet = _fleet(hosts, cheaters, truth, seed)
    buyer = User.objects.create(username=f"buyer-{seed}", email=f"buyer-{seed}@bench.local", role="buyer")
    # Enough credit for the job's escrow (what it costs is the billing bench's business).
    credit_grant(user=buyer, amount_minor=10_000_000, key=f"bench-trust:{seed}", memo="bench credit")
    rate = {} if canaries else {"HEARTH_CANARY_RATE_MAX": 0.0, "HEARTH_CANARY_RATE_MIN": 0.0}
    started = time.perf_counter()
    with override_settings(**rate):
        job_id = _job(buyer, model.name, tasks, **verification)
        compute = _drive(fleet, [job_id], rng)
    seconds = time.perf_counter() - started
    runs = _runs_by_kind([job_id], fleet)
    wrong, delivered = _delivered_wrong(job_id, truth, settings.HEARTH_EMBEDDING_MIN_COSINE)
    honest_judged = sum(c["passed"] + c["failed"] for k, c in runs.items() if k.startswith("honest"))
    honest_failed = sum(c["failed"] for k, c in runs.items() if k.startswith("honest"))
    cheat_runs = sum(sum(c.values()) for k, c in runs.items() if not k.startswith("honest"))
    cheat_caught = sum(c["failed"] for k, c in runs.items() if not k.startswith("honest"))
    strikes = Counter(Strike.objects.filter(host__name__contains=f"-{seed}-").values_list("kind", flat=True))
    useful = compute.get("primary", 0)
    extra = sum(v for k, v in compute.items() if k != "primary")
    return {
        "scenario": name,
        "seconds": round(seconds, 2),
        "fleet": dict(Counter(sim.kind for sim in fleet)),
        "runs_by_kind": {k: dict(v) for k, v in runs.items()},
        "cheated_runs": cheat_runs,
        "cheated_runs_caught": cheat_caught,
        "honest_runs_judged": honest_judged,
        "honest_runs_failed": honest_failed,
        "wrong_results_delivered": wrong,
        "results_delivered": delivered,
        "compute_items": compute,
        "overhead": round(extra / useful, 4) if useful else None,
        "strikes": dict(strikes),
        "quarantined": sum(
            1
            for sim in fleet
            if type(sim.host).objects.filter(pk=sim.host.pk, quarantined_at__isnull=False).exists()
        ),
        "job_status": _status(job_id),
        "_fleet": fleet,
        "_job": job_id,
    }


def _status(job_id: uuid.UUID) -> str:
    from marketplace.jobs.models import Job

    return str(Job.objects.get(pk=job_id).status)


def _bank(model: Any, truth: Truth, size: int = 200) -> None:
    from marketplace.trust.models import CanaryItem

    if CanaryItem.objects.filter(model=model).exists():
        return
    CanaryItem.objects.bulk_create(
        CanaryItem(model=model, weights_sha256=model.weights_sha256, text=t, embedding=truth(t).tobytes())
        for t in (f"canary {i}" for i in range(size))
    )


def spot_detection(result: dict[str, Any], n: int) -> tuple[float, int]:
    """Share of cheater hosts with a failed verdict among their first n primary runs."""
    from marketplace.jobs.models import Task

    caught = counted = 0
    for sim in result["_fleet"]:
        if sim.honest:
            continue
        runs = list(
            Task.objects.filter(job_id=result["_job"], role="primary", completed_by=sim.host.pk)
            .order_by("completed_at")
            .values_list("verdict", flat=True)[:n]
        )
        hit = "failed" in runs
        if hit or len(runs) == n:
            counted += 1
            caught += hit
    return (caught / counted if counted else 0.0), counted


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--hosts", type=int, default=24)
    parser.add_argument("--cheaters", type=float, default=0.25, help="share of the fleet that cheats")
    parser.add_argument("--tasks", type=int, default=300, help="tasks per scenario")
    parser.add_argument("--spot-f", type=float, default=0.1)
    parser.add_argument("--spot-n", type=int, default=15)
    parser.add_argument("--spot-hosts", type=int, default=160, help="fleet size of the spot scenario")
    parser.add_argument("--trusted-f", type=float, default=0.05, help="spot fraction for the overhead figure")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="hearth-bench-trust-") as tmp:
        _setup_django(os.path.join(tmp, "bench.sqlite3"))
        from marketplace.catalog.services import catalog_builtin_sync

        catalog_builtin_sync()
        print("baseline: no verification ...", flush=True)
        base = scenario(
            "none", hosts=args.hosts, cheaters=args.cheaters, tasks=args.tasks, seed=1, canaries=False
        )
        print("redundant, k=2 ...", flush=True)
        red = scenario(
            "redundant", hosts=args.hosts, cheaters=args.cheaters, tasks=args.tasks, seed=2, canaries=False,
            verification="redundant", replicas=2,
        )  # fmt: skip
        print(f"spot, f={args.spot_f}, {args.spot_hosts} hosts ...", flush=True)
        spot_tasks = args.spot_hosts * args.spot_n * 2
        with _no_quarantine():
            spot = scenario(
                "spot", hosts=args.spot_hosts, cheaters=args.cheaters, tasks=spot_tasks, seed=3, canaries=False,
                verification="spot", spot_fraction=args.spot_f,
            )  # fmt: skip
        detected, counted = spot_detection(spot, args.spot_n)
        print(f"trusted fleet overhead, spot f={args.trusted_f} + canaries ...", flush=True)
        trusted = scenario(
            "trusted", hosts=args.hosts, cheaters=0.0, tasks=args.tasks * 2, seed=4, canaries=True,
            verification="spot", spot_fraction=args.trusted_f,
        )  # fmt: skip

    for result in (base, red, spot, trusted):
        shown = {k: v for k, v in result.items() if not k.startswith("_")}
        print(json.dumps(shown, default=str))
    honest_judged = sum(r["honest_runs_judged"] for r in (red, spot, trusted))
    honest_failed = sum(r["honest_runs_failed"] for r in (red, spot, trusted))
    figures = {
        "hosts": args.hosts,
        "cheater_share": args.cheaters,
        "tasks": args.tasks,
        "detection_rate_redundant": round(red["cheated_runs_caught"] / red["cheated_runs"], 4)
        if red["cheated_runs"]
        else None,
        "detection_rate_spot": round(detected, 4),
        "expected_detection_spot": round(1 - (1 - args.spot_f) ** args.spot_n, 4),
        # One standard error of the expected figure over this many cheaters: "within noise" is ~2 of them.
        "expected_detection_spot_stderr": round(_stderr(1 - (1 - args.spot_f) ** args.spot_n, counted), 4),
        "spot_f": args.spot_f,
        "spot_n": args.spot_n,
        "spot_cheaters_counted": counted,
        "false_positive_rate": round(honest_failed / honest_judged, 6) if honest_judged else None,
        "honest_runs_judged": honest_judged,
        "verification_overhead": trusted["overhead"],
        "verification_overhead_redundant": red["overhead"],
        "wrong_results_delivered_redundant": red["wrong_results_delivered"],
        "wrong_results_delivered_spot_sampling_only": spot["wrong_results_delivered"],
        "baseline_none_wrong_results_delivered": base["wrong_results_delivered"],
        "baseline_none_results_delivered": base["results_delivered"],
        "baseline_none_overhead": base["overhead"],
        # BOINC-style fixed replication is the redundant scenario: every task twice, whatever the host.
        "overhead_ratio_vs_fixed_replication": round(trusted["overhead"] / red["overhead"], 4)
        if red["overhead"]
        else None,
        "seconds": round(sum(r["seconds"] for r in (base, red, spot, trusted)), 1),
    }
    print(json.dumps(figures))


def _stderr(p: float, n: int) -> float:
    return float(np.sqrt(p * (1 - p) / n)) if n else float("nan")


class _no_quarantine:
    """For the spot figure, sampling alone: cheaters keep working after a strike (so each does its n
    tasks) and a strike does not send their other results for re-checking."""

    def __enter__(self) -> None:
        from django.test import override_settings

        self._override = override_settings(
            HEARTH_STRIKES_TO_QUARANTINE=10**6, HEARTH_RECHECK_AFTER_STRIKE=False
        )
        self._override.enable()

    def __exit__(self, *exc: object) -> None:
        self._override.disable()


if __name__ == "__main__":
    main()
