"""A whole Hearth on one machine, as real processes: the demo and the integration tests use it.

It prepares a database (a SQLite file, or a fresh PostgreSQL database when
`DATABASE_URL` is set), starts uvicorn on a free loopback port (plus a Celery
worker with beat when `REDIS_URL` is set), and starts `hearth-agent`
processes that enroll through the public API. It talks to the server only
over HTTP and websockets, as users and agents do.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

ROOT = Path(__file__).resolve().parent.parent

# uvicorn's websocket options for the server (infra/Procfile says the same). No per-message
# compression: the frames are small JSON, and each socket kept zlib's state. No transport pings
# from the server: agents beat every 10 s and the sweep closes a silent host's socket after two
# intervals, so a ping per socket every 20 s (500 frames/s at 10,000) checked what was checked.
# Both off, at 10,000 agents (bench.fanin): server RSS 1,021 → 531 MB (~49 KB a socket), heartbeat
# p50 19 → 5 ms, all connected in 42 s instead of 92.
SERVER_WS_ARGS = ("--ws-per-message-deflate", "false", "--ws-ping-interval", "0")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _child_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(ROOT), str(ROOT / "agent")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def _postgres_database(base_url: str, name: str, *, create: bool) -> str:
    """Create (or drop) a database beside the one in `base_url`; return its URL."""
    import psycopg

    parts = urlsplit(base_url)
    with psycopg.connect(base_url, autocommit=True) as conn:
        if create:
            conn.execute(f'CREATE DATABASE "{name}"')
        else:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return urlunsplit(parts._replace(path=f"/{name}"))


# Which stack holds a Redis database: "<pid> <token>". Everything a stack keeps in Redis (Celery's
# queue, the channel layer, the presence hash) is per database, so stacks alive at the same time (the
# tests' shared stack beside a test's own) cannot take each other's heartbeats or tasks.
_REDIS_OWNER_KEY = "hearth:devstack:owner"
_REDIS_DATABASES = range(1, 16)  # 0 is left to whoever set REDIS_URL


def _redis_claim(base_url: str, token: str) -> str:
    """Claim a Redis database beside the one in `base_url` for one stack, emptied; return its URL.

    A database is free when no stack holds it, or when the process that held it is gone.
    """
    import redis

    parts = urlsplit(base_url)
    for db in _REDIS_DATABASES:
        url = urlunsplit(parts._replace(path=f"/{db}"))
        with redis.Redis.from_url(url) as client:
            owner = client.get(_REDIS_OWNER_KEY)
            if owner is not None and _pid_alive(int(owner.split()[0])):
                continue
            claim = f"{os.getpid()} {token}"
            with client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(_REDIS_OWNER_KEY)
                    if pipe.get(_REDIS_OWNER_KEY) != owner:
                        continue
                    pipe.multi()
                    pipe.flushdb()
                    pipe.set(_REDIS_OWNER_KEY, claim)
                    pipe.execute()
                except redis.WatchError:
                    continue  # another stack claimed it first
            return url
    raise RuntimeError(f"every Redis database 1-15 at {parts.netloc} is held by a running stack")


def _redis_release(url: str, token: str) -> None:
    import redis

    with redis.Redis.from_url(url) as client:
        owner = client.get(_REDIS_OWNER_KEY)
        if owner is not None and owner.decode().endswith(f" {token}"):
            client.flushdb()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class AgentProcess:
    name: str
    home: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class LocalStack:
    """Start with `start()`, stop with `stop()`; `url` is the server's base URL."""

    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="hearth-stack-")))
    settings_env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    quiet: bool = True
    # Agents' model and benchmark cache; tests share one across stacks so each agent does not
    # measure the same hardware again (each still verifies every model digest).
    agent_cache: Path | None = None
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    agents: list[AgentProcess] = field(default_factory=list)
    _server: subprocess.Popen[bytes] = field(init=False)
    _pg_database: str | None = None
    _redis_url: str | None = None
    _token: str = field(default_factory=lambda: uuid.uuid4().hex)
    _env: dict[str, str] = field(default_factory=dict)
    _keys: dict[tuple[str, str], str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- lifecycle ----

    def start(self) -> LocalStack:
        self.port = self.port or free_port()
        stripe_port = free_port()
        env = {
            "HEARTH_VAR_DIR": str(self.workdir / "var"),
            "HEARTH_PUBLIC_URL": f"http://127.0.0.1:{self.port}",
            # Payments go to a local fake Stripe, which delivers its webhooks back to the server.
            "HEARTH_STRIPE_API_BASE": f"http://127.0.0.1:{stripe_port}",
            "HEARTH_STRIPE_API_KEY": "sk_test_localstack",
            "HEARTH_STRIPE_WEBHOOK_SECRET": f"whsec_{uuid.uuid4().hex}",
            **self.settings_env,
        }
        base_db = os.environ.get("DATABASE_URL")
        if base_db:
            self._pg_database = f"hearth_stack_{uuid.uuid4().hex[:10]}"
            env["DATABASE_URL"] = _postgres_database(base_db, self._pg_database, create=True)
        else:
            env["HEARTH_SQLITE_PATH"] = str(self.workdir / "hearth.sqlite3")
        base_redis = os.environ.get("REDIS_URL")
        if base_redis:
            self._redis_url = env["REDIS_URL"] = _redis_claim(base_redis, self._token)
        self._env = _child_env(env)
        manage = [sys.executable, str(ROOT / "manage.py")]
        subprocess.run([*manage, "migrate", "--noinput", "-v0"], env=self._env, check=True, cwd=ROOT)
        # The catalog (with its known-answer bank), and the wheel and systemd unit that /install.sh
        # hands to new hosts: independent, so built side by side.
        builds = {
            command: subprocess.Popen(
                [*manage, command], env=self._env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
            )
            for command in ("catalog_sync", "agent_wheel")
        }
        for command, build in builds.items():
            output, _ = build.communicate()
            if build.returncode != 0:
                raise subprocess.CalledProcessError(build.returncode, command, output)
        self._spawn(
            "fake-stripe",
            [
                sys.executable, "-m", "marketplace.billing.fake_stripe", "--port", str(stripe_port),
                "--webhook-url", f"{self.url}/api/v1/billing/stripe/webhook",
                "--webhook-secret", env["HEARTH_STRIPE_WEBHOOK_SECRET"],
            ],
        )  # fmt: skip
        self._server = self._start_server()
        if os.environ.get("REDIS_URL") and self._env.get("HEARTH_BACKGROUND", "celery") == "celery":
            self._spawn(
                "celery",
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "marketplace.config.celery",
                    "worker",
                    "--beat",
                    "--pool",
                    "solo",
                    "--loglevel",
                    "INFO",
                    "--schedule",
                    str(self.workdir / "celerybeat-schedule"),
                ],
            )
        self._wait_http(f"{self.url}/api/v1/models", timeout=60)
        return self

    def _start_server(self) -> subprocess.Popen[bytes]:
        return self._spawn(
            "server",
            [
                sys.executable, "-m", "uvicorn", "marketplace.config.asgi:application",
                "--host", "127.0.0.1", "--port", str(self.port), "--lifespan", "on",
                "--ws-max-size", str(32 * 1024 * 1024), *SERVER_WS_ARGS,
            ],
        )  # fmt: skip

    def server_cpu_s(self) -> float | None:
        """CPU seconds the server process has used so far (Linux /proc; None elsewhere)."""
        try:
            fields = Path(f"/proc/{self._server.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def crash_and_restart_server(self) -> None:
        """SIGKILL the server (no goodbye to any socket), then start it again on the same port."""
        os.killpg(self._server.pid, signal.SIGKILL)
        self._server.wait(timeout=10)
        self.processes.remove(self._server)
        self._server = self._start_server()
        self._wait_http(f"{self.url}/api/v1/models", timeout=60)

    def stop(self) -> None:
        for agent in self.agents:
            agent.stop()
        for process in reversed(self.processes):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=5)
        if self._pg_database and os.environ.get("DATABASE_URL"):
            with contextlib.suppress(Exception):
                _postgres_database(os.environ["DATABASE_URL"], self._pg_database, create=False)
        if self._redis_url:
            with contextlib.suppress(Exception):
                _redis_release(self._redis_url, self._token)

    def cleanup(self) -> None:
        shutil.rmtree(self.workdir, ignore_errors=True)

    def _spawn(
        self, name: str, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = (self.workdir / f"{name}.log").open("ab")
        process = subprocess.Popen(
            argv, cwd=ROOT, env=env or self._env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.processes.append(process)
        return process

    def _wait_http(self, url: str, *, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.processes):
                raise RuntimeError(f"a stack process exited early; see logs in {self.workdir}\n{self.logs()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            time.sleep(0.2)
        raise TimeoutError(f"{url} did not answer within {timeout}s")

    def logs(self) -> str:
        return "\n".join(
            f"==== {path.name}\n{path.read_text(errors='replace')[-6000:]}"
            for path in sorted(self.workdir.glob("*.log"))
        )

    # ---- users, through the public API ----

    def client(
        self, *, auth: Any = None, headers: dict[str, str] | None = None, **kwargs: Any
    ) -> httpx.Client:
        """An HTTP client of the server; `auth=(email, password)` signs in with an API key of that
        user instead (see `auth_headers`)."""
        if isinstance(auth, tuple):
            headers, auth = {**(headers or {}), **self.auth_headers(auth)}, None
        return httpx.Client(base_url=self.url, timeout=60, auth=auth, headers=headers, **kwargs)

    def auth_headers(self, user: tuple[str, str]) -> dict[str, str]:
        """Bearer headers with an API key of `user`, made once per stack: a password on each request
        costs the server a PBKDF2 (0.54 s of CPU here), and pollers ask several times a second."""
        key = self._keys.get(user)
        if key is None:
            key = self._keys[user] = self.api_key(email=user[0], password=user[1], name="devstack")
        return {"Authorization": f"Bearer {key}"}

    def signup(
        self, *, email: str, password: str = "correct-horse-battery", role: str = "buyer"
    ) -> tuple[str, str]:
        with self.client() as http:
            response = http.post(
                "/api/v1/auth/signup", json={"email": email, "password": password, "role": role}
            )
            response.raise_for_status()
        return email, password

    def api_key(self, *, email: str, password: str, name: str = "default") -> str:
        with httpx.Client(base_url=self.url, timeout=60, auth=(email, password)) as http:
            response = http.post("/api/v1/keys", json={"name": name})
            response.raise_for_status()
            return str(response.json()["key"])

    def buyer(self, email: str | None = None, *, credit_minor: int = 100_000) -> str:
        """Sign up a buyer, top up `credit_minor` of credit through (fake) Stripe Checkout, and return
        an API key for them."""
        email, password = self.signup(email=email or f"buyer-{uuid.uuid4().hex[:8]}@example.com")
        api_key = self.api_key(email=email, password=password)
        if credit_minor:
            self.top_up(headers={"Authorization": f"Bearer {api_key}"}, amount_minor=credit_minor)
        return api_key

    def top_up(self, *, amount_minor: int, timeout: float = 30, **auth: Any) -> dict[str, Any]:
        """Buy credit as a buyer does: open a Checkout Session, pay on its page, wait for the webhook
        to credit it. `auth` is what `client()` takes (headers=… or auth=…). Returns the balance."""
        with self.client(**auth) as http:
            before = int(http.get("/api/v1/billing/balance").json()["buyer_credit_minor"])
            response = http.post("/api/v1/billing/topups", json={"amount_minor": amount_minor})
            response.raise_for_status()
            httpx.get(response.json()["checkout_url"], timeout=30).raise_for_status()  # the buyer pays
            deadline = time.monotonic() + timeout
            while True:
                balance: dict[str, Any] = http.get("/api/v1/billing/balance").json()
                if balance["buyer_credit_minor"] >= before + amount_minor:
                    return balance
                if time.monotonic() > deadline:
                    raise TimeoutError(f"top-up of {amount_minor} never credited; balance {balance}")
                time.sleep(0.1)

    def payouts_enable(self, *, owner: tuple[str, str]) -> str:
        """A host owner onboards to Stripe Connect (the fake's onboarding page finishes at once)."""
        with self.client(auth=owner) as http:
            response = http.post("/api/v1/billing/connect")
            response.raise_for_status()
            httpx.get(response.json()["onboarding_url"], timeout=30).raise_for_status()
            return str(response.json().get("account_id", ""))

    def enrollment_token(self, *, owner: tuple[str, str]) -> str:
        with self.client(auth=owner) as http:
            response = http.post("/api/v1/hosts/enrollment-tokens")
            response.raise_for_status()
            return str(response.json()["token"])

    # ---- agents, as real processes ----

    def agent_command(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "hearth_agent", *args]

    def enroll_agent(self, *, name: str, token: str) -> Path:
        home = self.workdir / "agents" / name
        home.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            self.agent_command(
                "enroll", "--server", self.url, "--token", token, "--name", name, "--home", str(home)
            ),
            env=self._agent_env(),
            check=True,
            capture_output=True,
            timeout=60,
        )
        return home

    def start_agent(
        self, *, name: str, home: Path, extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None
    ) -> AgentProcess:
        log_path = self.workdir / f"agent-{name}.log"
        log = log_path.open("ab")
        process = subprocess.Popen(
            self.agent_command("run", "--home", str(home), *extra_args),
            cwd=ROOT,
            env={**self._agent_env(), **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        agent = AgentProcess(name=name, home=home, process=process, log_path=log_path)
        self.agents.append(agent)
        return agent

    def _agent_env(self) -> dict[str, str]:
        # Agents share one model cache in the demo and tests, as if the blobs
        # had been fetched before; each still verifies every digest.
        env = {key: value for key, value in self._env.items() if key not in {"DATABASE_URL", "REDIS_URL"}}
        env.setdefault("HEARTH_AGENT_CACHE", str(self.agent_cache or self.workdir / "agent-cache"))
        return env

    def wait_hosts_ready(
        self, *, owner: tuple[str, str], count: int, timeout: float = 120, verified: bool = True
    ) -> list[dict[str, Any]]:
        """Wait for `count` of the owner's agents online and ready, and (by default) verified: past
        their known-answer tasks with a plausible benchmark, so they get buyers' work."""
        deadline = time.monotonic() + timeout
        hosts: list[dict[str, Any]] = []
        with self.client(auth=owner) as http:
            while time.monotonic() < deadline:
                hosts = [
                    h
                    for h in http.get("/api/v1/hosts").json()
                    if h["status"] == "online" and h["ready"] and (h["trust"]["verified"] or not verified)
                ]
                if len(hosts) >= count:
                    return hosts
                time.sleep(0.3)
        raise TimeoutError(f"only {len(hosts)} of {count} agents became ready/verified\n{self.logs()}")

    # ---- jobs, through the public API ----

    def wait_job(
        self,
        *,
        api_key: str,
        job_id: str,
        timeout: float = 300,
        on_progress: Any = None,
        poll_s: float = 0.2,
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        with self.client(headers={"Authorization": f"Bearer {api_key}"}) as http:
            while time.monotonic() < deadline:
                answer = http.get(f"/api/v1/jobs/{job_id}")
                if answer.status_code != 200:
                    # Named, with the server's own account of it: a bare JSON error said neither.
                    raise RuntimeError(
                        f"GET /api/v1/jobs/{job_id} answered {answer.status_code}: {answer.text[:300]!r}\n"
                        f"{self.logs()}"
                    )
                job = answer.json()
                if on_progress is not None:
                    on_progress(job)
                if job["status"] in {"succeeded", "failed", "cancelled"}:
                    return dict(job)
                time.sleep(poll_s)
        raise TimeoutError(f"job {job_id} did not finish within {timeout}s\n{self.logs()}")
