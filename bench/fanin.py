"""Fan-in: one ASGI server process holding many agent websockets, with PostgreSQL and Redis.

    python -m bench.fanin [--agents 10000] [--clients 4] [--storm 1000] [--hold 35] [--no-baseline] [--unverified]

Hosts and their tokens are created in bulk through the ORM, verified (as the hosts of a fleet that
has been serving are; `--unverified`: as new enrollments, each of whose `ready` asks for a
known-answer task); then `--clients` processes each open their share of websockets to one
uvicorn process (as devstack starts it) and speak the real protocol: hello → welcome → ready,
then a heartbeat every HEARTH_HEARTBEAT_INTERVAL_S (10 s) at a random phase, each asking for a
`heartbeat.ack`, and a websocket ping every 20 s, as the agent's connection sends. After
`--hold` seconds, `--storm` agents drop their sockets at the same instant and reconnect at once.
Then, unless `--no-baseline`, the server is restarted with HEARTH_PRESENCE=db (one UPDATE per
heartbeat, the old path) and the same agents hold again, to compare database writes.

PostgreSQL and Redis: DATABASE_URL's server (a scratch database is created and dropped) and
REDIS_URL, or, when unset, a throwaway PostgreSQL cluster and `redis-server` on free loopback
ports, stopped afterwards. The machine may be shared: the figures are only as quiet as it is.

The last stdout line is one JSON object:
  agents_connected     hosts the server holds online at the end of the hold (hosts table), which
                       is also the number of clients that got `welcome` and kept their socket
  drops                client sockets closed without the client asking (whole run)
  heartbeat_p99_ms     99th percentile of heartbeat → heartbeat.ack round trips seen by clients
                       during the hold, which starts `--settle` seconds after the last welcome
                       (the ack is sent once the beat is in the presence store); also p50
  server_rss_mb        the uvicorn process's peak VmRSS (/proc) sampled through the hold
  reconnect_storm_s    from the instant `--storm` clients dropped their sockets until the last of
                       them had `welcome` again on a new one
  db_row_writes_per_s  hosts + tasks rows updated per second during the hold (pg_stat_user_tables)
  db_xacts_per_s       committed transactions per second during the hold (pg_stat_database)
  baseline_*           the same two figures with HEARTH_PRESENCE=db (absent with --no-baseline)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing as mp
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench._args import positive_float, positive_int
from bench._pg import scratch_database, throwaway_postgres
from marketplace.config.gc_tuning import collect_young_after
from marketplace.devstack import SERVER_WS_ARGS, free_port

ROOT = Path(__file__).resolve().parent.parent
HEARTBEAT_S = 10.0


# ---- infrastructure -----------------------------------------------------------------


@contextlib.contextmanager
def throwaway_redis() -> Iterator[str]:
    """`redis-server` on a free loopback port without persistence; stopped afterwards."""
    if shutil.which("redis-server") is None:
        raise SystemExit("no redis-server on PATH; set REDIS_URL instead")
    port = free_port()
    root = Path(tempfile.mkdtemp(prefix="hearth-bench-redis-"))
    process = subprocess.Popen(
        ["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--dir", str(root)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        import redis

        client = redis.Redis(port=port)
        for _ in range(100):
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


def raise_nofile(wanted: int) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(max(soft, wanted), hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return target


def _setup_django(database_url: str, redis_url: str) -> None:
    os.environ["DATABASE_URL"] = database_url
    os.environ["REDIS_URL"] = redis_url
    os.environ["HEARTH_BACKGROUND"] = "inprocess"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "marketplace.config.settings")
    os.environ.setdefault("HEARTH_LOG_LEVEL", "ERROR")
    import django

    django.setup()
    from django.core.management import call_command

    call_command("migrate", verbosity=0)


def hosts_create(count: int, *, verified: bool = True) -> list[str]:
    """`count` enrolled hosts of one owner, in bulk (verified, or not yet); returns their plaintext
    host tokens."""
    from django.utils import timezone

    from marketplace.accounts.models import User
    from marketplace.accounts.tokens import secret_issue
    from marketplace.hosts.models import Host
    from marketplace.hosts.services import HOST_TOKEN_KIND

    name = f"fanin-{time.time_ns()}"
    owner = User.objects.create_user(username=name, email=f"{name}@example.com", password=None, role="host")
    tokens: list[str] = []
    rows: list[Host] = []
    for i in range(count):
        issued = secret_issue(HOST_TOKEN_KIND)
        tokens.append(issued.plaintext)
        rows.append(
            Host(
                owner=owner,
                name=f"fanin-{i}",
                token_prefix=issued.prefix,
                token_digest=issued.digest,
                verified_at=timezone.now() if verified else None,
                hardware_ok=True if verified else None,
            )
        )
    Host.objects.bulk_create(rows, batch_size=1000)
    return tokens


def _db_counters() -> tuple[int, int]:
    """(rows updated in hosts + tasks, committed transactions) so far in this database."""
    from django.db import connection

    from marketplace.hosts.models import Host
    from marketplace.jobs.models import Task

    with connection.cursor() as cursor:
        if connection.pg_version >= 150000:  # type: ignore[attr-defined]
            # Statistics reach the views up to a second late otherwise.
            cursor.execute("SELECT pg_stat_force_next_flush()")
        cursor.execute(
            "SELECT coalesce(sum(n_tup_upd), 0) FROM pg_stat_user_tables WHERE relname IN (%s, %s)",
            [Host._meta.db_table, Task._meta.db_table],
        )
        updated = int(cursor.fetchone()[0])
        cursor.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()")
        commits = int(cursor.fetchone()[0])
    return updated, commits


def _hosts_online() -> int:
    from marketplace.hosts.models import Host

    return Host.objects.filter(status=Host.Status.ONLINE).exclude(channel_name="").count()


@dataclass
class Server:
    port: int
    env: dict[str, str]
    log_path: Path
    process: subprocess.Popen[bytes] = field(init=False)

    def start(self) -> Server:
        log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "uvicorn", "marketplace.config.asgi:application",
                "--host", "127.0.0.1", "--port", str(self.port), "--lifespan", "on",
                "--backlog", "4096", "--log-level", "warning", "--no-access-log", *SERVER_WS_ARGS,
            ],
            cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        import httpx

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise SystemExit(f"the server exited; see {self.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{self.port}/api/v1/models", timeout=2).status_code == 200:
                    return self
            time.sleep(0.2)
        raise SystemExit(f"the server did not answer within 60 s; see {self.log_path}")

    def rss_mb(self) -> float:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=5)


# ---- simulated agents (one asyncio loop per client process) -----------------------------


@dataclass
class Agent:
    token: str
    ws: Any = None
    welcomed_at: float = 0.0
    closing: bool = False
    pending: dict[str, float] = field(default_factory=dict)


@dataclass
class ClientStats:
    welcomed: int = 0
    drops: int = 0
    errors: int = 0
    rtts_ms: list[float] = field(default_factory=list)
    storm_last_welcome: float = 0.0


def _hello() -> str:
    from hearth_agent import protocol

    return protocol.dump_frame(
        protocol.Hello(
            payload=protocol.HelloPayload(
                agent_version="bench-fanin",
                protocol_version=protocol.PROTOCOL_VERSION,
                hostname="sim",
                os="Linux",
                cpu_model="simulated",
                cpu_count=4,
                memory_mb=8192,
                device="cpu",
                slots=1,
            )
        )
    )


class Fleet:
    """This process's share of agents: connect, beat, drop and reconnect on command."""

    def __init__(self, url: str, tokens: list[str], interval_s: float) -> None:
        self.url = url
        self.agents = [Agent(token=t) for t in tokens]
        self.interval_s = interval_s
        self.stats = ClientStats()
        self.measuring = False
        self.gate = asyncio.Semaphore(16)
        self.tasks: set[asyncio.Task[None]] = set()

    async def connect(self, agent: Agent) -> bool:
        from websockets.asyncio.client import connect

        from hearth_agent import protocol

        async with self.gate:
            for attempt in range(20):
                ws = None
                try:
                    ws = await connect(
                        self.url,
                        additional_headers={"Authorization": f"Bearer {agent.token}"},
                        open_timeout=60,
                        # websockets' keepalive, as the agent's own connect keeps it (a ping every 20 s).
                    )
                    await ws.send(_hello())
                    while True:
                        frame = protocol.parse_frame(await asyncio.wait_for(ws.recv(), 60))
                        if isinstance(frame, protocol.Welcome):
                            break
                    agent.ws, agent.welcomed_at, agent.closing = ws, time.time(), False
                    ready = protocol.Ready(payload=protocol.ReadyPayload(models=[], free_slots=1))
                    await ws.send(protocol.dump_frame(ready))
                    break
                except Exception:
                    self.stats.errors += 1
                    if ws is not None:
                        # Give up this socket before opening the next: left open, it would hold a
                        # second session for the same host on the server.
                        ws.transport.abort()
                    await asyncio.sleep(0.2 * (attempt + 1) + random.random())
            else:
                return False
        self.stats.welcomed += 1
        self._spawn(self.receive(agent, ws))
        self._spawn(self.beat(agent, ws))
        return True

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def receive(self, agent: Agent, ws: Any) -> None:
        from hearth_agent import protocol

        try:
            async for raw in ws:
                frame = protocol.parse_frame(raw)
                if isinstance(frame, protocol.HeartbeatAck):
                    sent = agent.pending.pop(frame.payload.heartbeat_id, None)
                    if sent is not None and self.measuring:
                        self.stats.rtts_ms.append((time.perf_counter() - sent) * 1000)
        except Exception:
            pass
        if not agent.closing and agent.ws is ws:
            self.stats.drops += 1

    async def beat(self, agent: Agent, ws: Any) -> None:
        from hearth_agent import protocol

        await asyncio.sleep(random.uniform(0, self.interval_s))
        while agent.ws is ws and not agent.closing:
            frame = protocol.Heartbeat(
                payload=protocol.HeartbeatPayload(status="idle", free_slots=1, ack=True)
            )
            agent.pending = {frame.id: time.perf_counter()}
            try:
                await ws.send(protocol.dump_frame(frame))
            except Exception:
                return
            await asyncio.sleep(self.interval_s)

    async def connect_all(self) -> int:
        results = await asyncio.gather(*(self.connect(a) for a in self.agents))
        return sum(results)

    async def storm(self, count: int, at: float) -> float:
        """Drop `count` sockets at wall-clock `at` (no close handshake), reconnect all at once."""
        victims = self.agents[:count]
        await asyncio.sleep(max(0.0, at - time.time()))
        for agent in victims:
            agent.closing = True
            agent.ws.transport.abort()
        self.gate = asyncio.Semaphore(len(victims) or 1)
        await asyncio.gather(*(self.connect(a) for a in victims))
        return max((a.welcomed_at for a in victims), default=at)

    async def close_all(self) -> None:
        for agent in self.agents:
            agent.closing = True
        await asyncio.gather(*(a.ws.close() for a in self.agents if a.ws is not None), return_exceptions=True)


def _client_main(conn: Any, url: str, tokens: list[str], interval_s: float) -> None:
    raise_nofile(len(tokens) + 256)
    # Collected as the server's are: with CPython's default, a client holding 2,500 sockets stopped
    # for 0.7 s in full collections, and the stall counted as heartbeat round trip.
    collect_young_after()
    signal.signal(signal.SIGINT, signal.SIG_IGN)

    async def main() -> None:
        fleet = Fleet(url, tokens, interval_s)
        loop = asyncio.get_running_loop()
        while True:
            command, arg = await loop.run_in_executor(None, conn.recv)
            if command == "connect":
                conn.send(await fleet.connect_all())
            elif command == "measure":
                fleet.stats.rtts_ms.clear()
                fleet.measuring = arg
                conn.send(True)
            elif command == "storm":
                count, at = arg
                conn.send(await fleet.storm(count, at))
            elif command == "stats":
                conn.send(fleet.stats)
            elif command == "close":
                await fleet.close_all()
                conn.send(fleet.stats)
                return

    asyncio.run(main())


class Clients:
    def __init__(self, url: str, tokens: list[str], processes: int, interval_s: float) -> None:
        ctx = mp.get_context("spawn")
        self.pipes: list[Any] = []
        self.procs: list[Any] = []
        self.shares = [tokens[i::processes] for i in range(processes)]
        for share in self.shares:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_client_main, args=(child, url, share, interval_s), daemon=True)
            proc.start()
            self.pipes.append(parent)
            self.procs.append(proc)

    def ask(self, command: str, arg: Any = None, args: list[Any] | None = None) -> list[Any]:
        for i, pipe in enumerate(self.pipes):
            pipe.send((command, args[i] if args is not None else arg))
        return [pipe.recv() for pipe in self.pipes]

    def stop(self) -> None:
        for proc in self.procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()


# ---- the run ---------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Phase:
    connected_clients: int = 0
    hosts_online: int = 0
    drops: int = 0
    rtts_ms: list[float] = field(default_factory=list)
    rss_mb: float = 0.0
    row_writes_per_s: float = 0.0
    xacts_per_s: float = 0.0
    storm_s: float | None = None
    connect_s: float = 0.0


def run_phase(
    *,
    server_env: dict[str, str],
    tokens: list[str],
    clients: int,
    hold_s: float,
    settle_s: float,
    storm: int,
    workdir: Path,
) -> Phase:
    port = free_port()
    server = Server(port=port, env=server_env, log_path=workdir / f"server-{port}.log").start()
    fleet = Clients(f"ws://127.0.0.1:{port}/ws/agent/", tokens, clients, HEARTBEAT_S)
    phase = Phase()
    try:
        started = time.monotonic()
        phase.connected_clients = sum(fleet.ask("connect"))
        phase.connect_s = time.monotonic() - started
        print(f"{phase.connected_clients} agents welcomed in {phase.connect_s:.1f} s", file=sys.stderr)
        # The frames of the ramp (ready, claims) drain first: the hold measures the steady state.
        time.sleep(settle_s)
        fleet.ask("measure", True)
        updates0, commits0 = _db_counters()
        held_from = time.monotonic()
        while time.monotonic() - held_from < hold_s:
            phase.rss_mb = max(phase.rss_mb, server.rss_mb())
            time.sleep(1.0)
        held = time.monotonic() - held_from
        updates1, commits1 = _db_counters()
        phase.row_writes_per_s = (updates1 - updates0) / held
        phase.xacts_per_s = (commits1 - commits0) / held
        phase.hosts_online = _hosts_online()
        phase.rss_mb = max(phase.rss_mb, server.rss_mb())
        stats = fleet.ask("stats")
        fleet.ask("measure", False)
        phase.rtts_ms = [rtt for s in stats for rtt in s.rtts_ms]
        if storm:
            at = time.time() + 1.0
            shares = [
                min(len(s), storm // clients + (i < storm % clients)) for i, s in enumerate(fleet.shares)
            ]
            last = fleet.ask("storm", args=[(n, at) for n in shares])
            phase.storm_s = max(last) - at
            phase.rss_mb = max(phase.rss_mb, server.rss_mb())
            print(f"{sum(shares)} agents reconnected in {phase.storm_s:.2f} s", file=sys.stderr)
        final = fleet.ask("close")
        phase.drops = sum(s.drops for s in final)
    finally:
        fleet.stop()
        server.stop()
    return phase


def run(
    *,
    agents: int,
    clients: int,
    hold_s: float,
    settle_s: float = HEARTBEAT_S,
    storm: int,
    baseline: bool,
    database_url: str,
    redis_url: str,
    verified: bool = True,
) -> dict[str, Any]:
    raise_nofile(agents + 1024)
    _setup_django(database_url, redis_url)
    tokens = hosts_create(agents, verified=verified)
    workdir = Path(tempfile.mkdtemp(prefix="hearth-bench-fanin-"))
    base_env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "agent"), os.environ.get("PYTHONPATH", "")]),
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "HEARTH_BACKGROUND": "inprocess",
        "HEARTH_HEARTBEAT_INTERVAL_S": str(HEARTBEAT_S),
        "HEARTH_LOG_LEVEL": "WARNING",
        "HEARTH_VAR_DIR": str(workdir / "var"),
    }
    try:
        coalesced = run_phase(
            server_env={**base_env, "HEARTH_PRESENCE": "redis"},
            tokens=tokens,
            clients=clients,
            hold_s=hold_s,
            settle_s=settle_s,
            storm=min(storm, agents),
            workdir=workdir,
        )
        result: dict[str, Any] = {
            "agents": agents,
            "hosts_verified": verified,
            "agents_connected": min(coalesced.hosts_online, coalesced.connected_clients),
            "drops": coalesced.drops,
            "heartbeat_p99_ms": round(_percentile(coalesced.rtts_ms, 0.99), 2),
            "heartbeat_p50_ms": round(_percentile(coalesced.rtts_ms, 0.50), 2),
            "heartbeats_measured": len(coalesced.rtts_ms),
            "server_rss_mb": round(coalesced.rss_mb, 1),
            "reconnect_storm_s": None if coalesced.storm_s is None else round(coalesced.storm_s, 2),
            "connect_all_s": round(coalesced.connect_s, 1),
            "db_row_writes_per_s": round(coalesced.row_writes_per_s, 1),
            "db_xacts_per_s": round(coalesced.xacts_per_s, 1),
        }
        if baseline:
            old = run_phase(
                server_env={**base_env, "HEARTH_PRESENCE": "db"},
                tokens=tokens,
                clients=clients,
                hold_s=hold_s,
                settle_s=settle_s,
                storm=0,
                workdir=workdir,
            )
            result |= {
                "baseline_db_row_writes_per_s": round(old.row_writes_per_s, 1),
                "baseline_db_xacts_per_s": round(old.xacts_per_s, 1),
                "baseline_heartbeat_p99_ms": round(_percentile(old.rtts_ms, 0.99), 2),
                "baseline_drops": old.drops,
            }
    finally:
        if os.environ.get("HEARTH_BENCH_KEEP"):
            print(f"server logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--agents", type=positive_int, default=10_000)
    parser.add_argument("--clients", type=positive_int, default=4, help="client processes")
    parser.add_argument(
        "--hold", type=positive_float, default=35.0, help="seconds of steady heartbeats measured"
    )
    parser.add_argument(
        "--settle", type=float, default=HEARTBEAT_S, help="seconds after the ramp, unmeasured"
    )
    parser.add_argument(
        "--storm", type=positive_int, default=1000, help="agents dropped and reconnected at once"
    )
    parser.add_argument("--no-baseline", dest="baseline", action="store_false")
    parser.add_argument(
        "--unverified", dest="verified", action="store_false", help="hosts not yet verified (new enrollments)"
    )
    args = parser.parse_args()
    # Stopped (`timeout`, kill): unwind, so the server, the clients and the throwaway services stop too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with contextlib.ExitStack() as stack:
        server = os.environ.get("DATABASE_URL")
        if not server:
            server = stack.enter_context(throwaway_postgres())
            print(f"started a throwaway PostgreSQL at {server}", file=sys.stderr)
        redis_url = os.environ.get("REDIS_URL")
        if not redis_url:
            redis_url = stack.enter_context(throwaway_redis())
            print(f"started a throwaway Redis at {redis_url}", file=sys.stderr)
        database = stack.enter_context(scratch_database(server))
        result = run(
            agents=args.agents,
            clients=args.clients,
            hold_s=args.hold,
            settle_s=args.settle,
            storm=args.storm,
            baseline=args.baseline,
            database_url=database,
            redis_url=redis_url,
            verified=args.verified,
        )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
