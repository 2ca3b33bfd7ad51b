"""The agent's side of the worker: start it in the sandbox, verify the isolation it got, feed it one
batch at a time, and replace it when it crashes or hangs. The worker outlives websocket reconnects."""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import itertools
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hearth_agent.sandbox import (
    IsolationProbe,
    PidsCgroup,
    ProcessView,
    SandboxPlan,
    WorkerLimits,
    python_paths,
    sandbox_choose,
)

log = logging.getLogger(__name__)

# One line carries a whole batch of vectors in base64; the default 64 KiB asyncio limit is far too small.
_LINE_LIMIT = 256 * 1024 * 1024
_STDERR_TAIL = 30
# Test-only: lets a task whose first input is `__hearth_probe__:<name>` run that escape probe in the
# worker instead of inference (see embed()). Production never sets it.
ALLOW_PROBES_ENV = "HEARTH_AGENT_ALLOW_PROBES"
PROBE_TASK_PREFIX = "__hearth_probe__:"
# What the worker inherits from the agent's environment; everything else (tokens, cloud keys,
# SSH_AUTH_SOCK, ...) stays out of it.
_ENV_PASSTHROUGH = ("PATH", "LANG", "LANGUAGE", "TZ", "LD_LIBRARY_PATH", "CUDA_VISIBLE_DEVICES")
_ENV_PASSTHROUGH_PREFIXES = ("LC_", "HEARTH_WORKER_", "OMP_", "MKL_", "NVIDIA_", "PYTORCH_", "TORCH_")
# A worker that has used this share of its lifetime CPU budget is replaced after its current batch.
_CPU_RECYCLE_SHARE = 0.8


class WorkerError(Exception):
    """A batch failed in (or because of) the worker."""

    def __init__(self, reason: str, *, retryable: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


class WorkerCrashed(WorkerError):
    """The worker process died or had to be killed; a fresh one is started."""


def describe_exit(code: int, *, via_sandbox: bool) -> str:
    """Name the signal that ended the worker (bwrap reports a child's death by signal N as 128+N)."""
    signum = -code if code < 0 else code - 128 if via_sandbox and 128 < code < 160 else 0
    if not signum:
        return f"worker exited with code {code}"
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    why = {
        "SIGXCPU": " (CPU time limit)",
        "SIGXFSZ": " (file size limit)",
        "SIGKILL": " (killed)",
        "SIGSYS": " (forbidden system call)",
    }.get(name, "")
    return f"worker exited with code {code}: killed by {name}{why}"


def _bwrap_exit_code(fd: int) -> int | None:
    """Read bwrap's JSON status lines until it closes the pipe; the worker's exit code if bwrap saw the
    worker end (a death by signal N is 128+N), None if bwrap itself was killed first."""
    exit_code = None
    with os.fdopen(fd, "rb") as status:
        for line in status:
            with contextlib.suppress(ValueError):
                report = json.loads(line)
                if isinstance(report, dict) and isinstance(report.get("exit-code"), int):
                    exit_code = report["exit-code"]
    return exit_code


@dataclass(frozen=True)
class WorkerInfo:
    pid: int  # as the host sees it (the worker's own pid differs in its pid namespace)
    sandbox: str
    isolation: list[str]
    torch_version: str
    device: str
    gpus: list[dict[str, Any]]
    threads: int
    start_ms: float
    inner_pid: int = 0


@dataclass(frozen=True)
class EmbedResult:
    embeddings: bytes  # little-endian float32, count × dimension
    count: int
    dimension: int
    compute_ms: float
    load_ms: float
    model_loads: int
    device: str


@dataclass
class _Process:
    proc: asyncio.subprocess.Process
    pending: dict[int, asyncio.Future[dict[str, Any]]] = field(default_factory=dict)
    stderr_tail: collections.deque[str] = field(
        default_factory=lambda: collections.deque(maxlen=_STDERR_TAIL)
    )
    readers: list[asyncio.Task[None]] = field(default_factory=list)
    ready: asyncio.Future[dict[str, Any]] | None = None
    was_ready: bool = False
    dead: bool = False
    via_sandbox: bool = False
    cgroup: PidsCgroup | None = None
    scratch: Path | None = None
    cpu_s: float = 0.0
    # bwrap's own report of how the worker ended (`--json-status-fd`), read from a pipe: unlike the
    # exit status of the bwrap process, nothing else in this process can reap it first.
    sandbox_status: asyncio.Future[int | None] | None = None


class WorkerSupervisor:
    """Owns at most one worker process at a time and runs batches on it sequentially."""

    def __init__(
        self,
        *,
        cache_dir: Path,
        sandbox: str = "auto",
        threads: int | None = None,
        hidden_paths: Sequence[Path] = (),
        start_timeout_s: float = 180.0,
        extra_env: dict[str, str] | None = None,
        limits: WorkerLimits | None = None,
        allow_probes: bool | None = None,
    ) -> None:
        self.cache_dir = cache_dir
        self.sandbox_mode = sandbox
        self.threads = threads
        self.hidden_paths = list(hidden_paths)
        self.start_timeout_s = start_timeout_s
        self.extra_env = extra_env or {}
        self.limits = limits or WorkerLimits.from_env(os.environ)
        self.allow_probes = os.environ.get(ALLOW_PROBES_ENV) == "1" if allow_probes is None else allow_probes
        self.info: WorkerInfo | None = None
        self.warm_models: list[str] = []
        self._model_dirs: dict[str, Path] = {}
        self.starts = 0
        self.on_ready: Callable[[WorkerInfo], None] | None = None
        self._plan: SandboxPlan | None = None
        self._current: _Process | None = None
        self._start_lock = asyncio.Lock()
        self._last_served: _Process | None = None
        self._batch_lock = asyncio.Lock()
        self._ids = itertools.count(1)
        # Strong references: the event loop only keeps weak ones to tasks. Pending restarts are
        # cancelled by stop().
        self._restarts: set[asyncio.Task[None]] = set()
        self._cgroup_removals: set[asyncio.Task[None]] = set()

    # ---- lifecycle --------------------------------------------------------

    def _env(self) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if key in _ENV_PASSTHROUGH or key.startswith(_ENV_PASSTHROUGH_PREFIXES)
        }
        package_parent = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_parent, os.environ.get("PYTHONPATH", "")) if p
        )
        env.update(
            {
                "HF_HUB_OFFLINE": "1",
                "TRANSFORMERS_OFFLINE": "1",
                "HF_DATASETS_OFFLINE": "1",
                "TOKENIZERS_PARALLELISM": "false",
                "PYTHONUNBUFFERED": "1",
                "PYTHONDONTWRITEBYTECODE": "1",
            }
        )
        if self.threads is not None:
            env["HEARTH_WORKER_THREADS"] = str(self.threads)
        env["HEARTH_WORKER_CONFINE"] = json.dumps({"rlimits": self.limits.rlimits(), "seccomp": True})
        env.update(self.extra_env)
        return env

    @property
    def running(self) -> bool:
        return self._current is not None and not self._current.dead

    async def start(self) -> WorkerInfo:
        """Start a worker unless one is alive; idempotent and safe to call concurrently."""
        async with self._start_lock:
            if self.running and self.info is not None:
                return self.info
            env = self._env()
            if self._plan is None:
                self.cache_dir.mkdir(parents=True, exist_ok=True)
                readable = [*python_paths(), self.cache_dir.resolve()]
                self._plan = await asyncio.to_thread(
                    sandbox_choose, self.sandbox_mode, env=env, readable=readable, hidden=self.hidden_paths
                )
                log.info("worker sandbox: %s", self._plan.kind)
            self.warm_models = []
            self.info = await self._spawn(self._plan, env)
            self.starts += 1
            log.info(
                "worker pid %d ready in %.0f ms: device=%s torch=%s threads=%d isolation=%s",
                self.info.pid,
                self.info.start_ms,
                self.info.device,
                self.info.torch_version,
                self.info.threads,
                self.info.isolation or "NONE",
            )
        if self.on_ready is not None:
            self.on_ready(self.info)
        return self.info

    async def _spawn(self, plan: SandboxPlan, env: dict[str, str]) -> WorkerInfo:
        probe = IsolationProbe(ro_probe_dir=self.cache_dir)
        started = time.perf_counter()
        # A fresh scratch dir per worker: bwrap gives a private tmpfs; otherwise a new temp dir.
        scratch = None if plan.scratch else Path(tempfile.mkdtemp(prefix="hearth-worker-"))
        scratch_path = plan.scratch or str(scratch)
        limit = self.limits.pids or self.limits.effective_nproc()
        cgroup = await asyncio.to_thread(
            PidsCgroup.create, f"hearth-worker-{os.getpid()}-{secrets.token_hex(4)}", limit
        )
        status_read, status_write = os.pipe() if plan.kind == "bwrap" else (-1, -1)
        prefix = plan.prefix
        if status_write >= 0:
            prefix = (prefix[0], "--json-status-fd", str(status_write), *prefix[1:])
        try:
            env = {**env, **probe.env(), "HOME": scratch_path, "TMPDIR": scratch_path}
            try:
                proc = await asyncio.create_subprocess_exec(
                    *(cgroup.prefix() if cgroup else ()),
                    *prefix,
                    sys.executable,
                    "-m",
                    "hearth_agent.worker",
                    stdin=asyncio.subprocess.PIPE,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.PIPE,
                    env=env,
                    cwd="/",
                    limit=_LINE_LIMIT,
                    pass_fds=(status_write,) if status_write >= 0 else (),
                )
            finally:
                if status_write >= 0:
                    os.close(status_write)
            current = _Process(
                proc=proc,
                ready=asyncio.get_running_loop().create_future(),
                via_sandbox=bool(plan.prefix),
                cgroup=cgroup,
                scratch=scratch,
            )
            if status_read >= 0:
                current.sandbox_status = asyncio.ensure_future(
                    asyncio.to_thread(_bwrap_exit_code, status_read)
                )
                status_read = -1
            current.readers = [
                asyncio.create_task(self._read_stdout(current)),
                asyncio.create_task(self._read_stderr(current)),
            ]
            self._current = current
            assert current.ready is not None
            try:
                hello = await asyncio.wait_for(asyncio.shield(current.ready), self.start_timeout_s)
            except (TimeoutError, WorkerCrashed) as exc:
                await self._kill(current, "did not start")
                tail = "\n".join(current.stderr_tail)
                raise WorkerError(f"worker failed to start ({exc or 'timeout'}): {tail[-1500:]}") from None
            report = hello.get("probe", {})
            inner_pid = int(report.get("pid", hello.get("pid", proc.pid)))
            view = await asyncio.to_thread(ProcessView.find, proc.pid, inner_pid)
            isolation = probe.verdict(plan, report, view)
            isolation += self._confinement_layers(hello.get("confinement", {}), view, cgroup)
        except BaseException:
            self._cleanup(cgroup, scratch)
            raise
        finally:
            probe.close()
            if status_read >= 0:
                os.close(status_read)
        return WorkerInfo(
            pid=view.pid if view else proc.pid,
            inner_pid=inner_pid,
            sandbox=plan.kind,
            isolation=isolation,
            torch_version=str(hello.get("torch_version", "")),
            device=str(hello.get("device", "cpu")),
            gpus=list(hello.get("gpus", [])),
            threads=int(hello.get("threads", 0)),
            start_ms=(time.perf_counter() - started) * 1000,
        )

    def _confinement_layers(
        self, confinement: dict[str, Any], view: ProcessView | None, cgroup: PidsCgroup | None
    ) -> list[str]:
        """seccomp, rlimits and the pids cgroup, each only as far as the host's /proc confirms it."""
        layers: list[str] = []
        if view is None:
            log.warning("could not find the worker in /proc: seccomp, rlimits and cgroup are unconfirmed")
            return layers
        if confinement.get("seccomp_ptrace") == "EPERM" and view.seccomp_mode == 2:
            layers.append("seccomp")
        else:
            log.warning(
                "seccomp deny-list not active (%s)", confinement.get("seccomp_error") or "ptrace not denied"
            )
        wanted = self.limits.rlimits()
        held = sorted(name for name, value in wanted.items() if view.hard_limits.get(name) == value)
        # The kernel never enforces RLIMIT_NPROC on uid 0, whatever the limit says.
        if view.uid == 0 and "nproc" in held:
            held.remove("nproc")
        held = [name for name in held if name != "core"]
        if held:
            layers.append("rlimits:" + ",".join(held))
        if cgroup is not None and cgroup.holds(view.pid):
            layers.append(f"cgroup-pids:{cgroup.limit}")
        return layers

    def _remove_cgroup_soon(self, cgroup: PidsCgroup) -> None:
        """The pid namespace dies with bwrap, but its members may take a few seconds to be reaped."""

        async def remove() -> None:
            for _ in range(120):
                cgroup.remove()
                if not cgroup.path.exists():
                    return
                await asyncio.sleep(0.25)
            log.warning("could not remove the worker cgroup %s", cgroup.path)

        task = asyncio.create_task(remove())
        self._cgroup_removals.add(task)
        task.add_done_callback(self._cgroup_removals.discard)

    @staticmethod
    def _cleanup(cgroup: PidsCgroup | None, scratch: Path | None) -> None:
        if cgroup is not None:
            cgroup.remove()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)

    async def _read_stdout(self, current: _Process) -> None:
        assert current.proc.stdout is not None
        try:
            while line := await current.proc.stdout.readline():
                try:
                    message = json.loads(line)
                except ValueError:
                    log.warning("worker wrote a non-JSON line on its channel: %.200r", line)
                    continue
                if message.get("type") == "ready" and current.ready is not None and not current.ready.done():
                    current.ready.set_result(message)
                    current.was_ready = True
                    continue
                future = current.pending.pop(message.get("id"), None)
                if future is not None and not future.done():
                    future.set_result(message)
        except (ValueError, asyncio.LimitOverrunError) as exc:
            log.error("worker channel broke: %s", exc)
        finally:
            await self._mark_dead(current)

    async def _read_stderr(self, current: _Process) -> None:
        assert current.proc.stderr is not None
        while line := await current.proc.stderr.readline():
            text = line.decode(errors="replace").rstrip()
            current.stderr_tail.append(text)
            log.debug("worker: %s", text)

    async def _mark_dead(self, current: _Process) -> None:
        if current.dead:
            return
        current.dead = True
        with contextlib.suppress(ProcessLookupError):
            current.proc.kill()
        code = await current.proc.wait()
        if current.sandbox_status is not None:
            with contextlib.suppress(TimeoutError):
                reported = await asyncio.wait_for(asyncio.shield(current.sandbox_status), 2.0)
                code = code if reported is None else reported
        # Let stderr drain so the crash reason includes the traceback.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(current.readers[1]), 2.0)
        self._cleanup(None, current.scratch)
        if current.cgroup is not None:
            self._remove_cgroup_soon(current.cgroup)
        tail = " | ".join(list(current.stderr_tail)[-5:])
        reason = describe_exit(code, via_sandbox=current.via_sandbox) + (f": {tail[-800:]}" if tail else "")
        if current.ready is not None and not current.ready.done():
            current.ready.set_exception(WorkerCrashed(reason))
        for future in current.pending.values():
            if not future.done():
                future.set_exception(WorkerCrashed(reason))
        current.pending.clear()
        if self._current is current:
            log.warning("%s", reason)
            # Only a worker that once came up is replaced on its own; one that cannot start
            # would otherwise be restarted in a tight loop.
            if current.was_ready:
                self._restart_soon()

    async def _kill(self, current: _Process, why: str) -> None:
        log.warning("killing worker pid %d: %s", current.proc.pid, why)
        with contextlib.suppress(ProcessLookupError):
            current.proc.kill()
        await self._mark_dead(current)

    async def abort(self, why: str) -> None:
        """Kill the worker mid-batch (a drain ran out of time): the batch fails with WorkerCrashed
        and a fresh worker starts at once."""
        current = self._current
        if current is not None and not current.dead:
            await self._kill(current, why)

    async def stop(self) -> None:
        # A restart still pending would bring a worker up after this stop: cancel it first. If it was
        # midway through a start, the half-started worker is by then the current one, stopped below.
        restarts = list(self._restarts)
        for task in restarts:
            task.cancel()
        await asyncio.gather(*restarts, return_exceptions=True)
        current, self._current = self._current, None
        if current is None:
            return
        if current.proc.stdin is not None:
            current.proc.stdin.close()
        # Closing stdin ends the worker's read loop; give it a moment to exit on its own.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(current.proc.wait(), 5.0)
        await self._mark_dead(current)
        for reader in current.readers:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        if self._cgroup_removals:
            await asyncio.wait(self._cgroup_removals, timeout=30.0)

    # ---- requests ---------------------------------------------------------

    async def _request(
        self, request: dict[str, Any], timeout_s: float | None, *, cpu_budget_s: float | None = None
    ) -> dict[str, Any]:
        """Send one request to the live worker and wait for its reply. Caller holds the batch lock.
        Two clocks bound it: the wall-clock timeout here (the worker is killed and replaced) and a
        CPU budget the kernel enforces in the worker (SIGXCPU), by default what the threads could
        burn in the wall-clock time."""
        info = await self.start()
        current = self._current
        assert current is not None and current.proc.stdin is not None
        # Which process served this request: a replacement may already be starting when it ends.
        self._last_served = current
        if cpu_budget_s is None and timeout_s is not None:
            cpu_budget_s = timeout_s * max(1, info.threads) + 5.0
        if cpu_budget_s is not None:
            request = {**request, "cpu_budget_s": cpu_budget_s}
        request_id = next(self._ids)
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        current.pending[request_id] = future
        try:
            current.proc.stdin.write(json.dumps({**request, "id": request_id}).encode() + b"\n")
            await current.proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            await self._mark_dead(current)
        try:
            reply = await asyncio.wait_for(asyncio.shield(future), timeout_s)
        except TimeoutError:
            await self._kill(current, f"request took longer than {timeout_s:.0f} s")
            raise WorkerCrashed(
                f"worker did not answer within {timeout_s:.0f} s (wall-clock limit); it was replaced"
            ) from None
        except asyncio.CancelledError:
            # Keep the lock until the worker is idle again, so the next batch starts on a free worker.
            with contextlib.suppress(Exception):
                await future
            raise
        current.cpu_s = float(reply.get("cpu_s") or 0.0)
        if reply.get("violation"):
            await self._kill(current, f"{reply['violation']} in the worker: replacing it with a fresh one")
            reply["reason"] = (
                f"{reply.get('reason', 'violation')} ({reply['violation']}); a fresh worker was started"
            )
        elif self.limits.cpu_s and current.cpu_s > _CPU_RECYCLE_SHARE * self.limits.cpu_s:
            await self._kill(
                current, f"it used {current.cpu_s:.0f} s of its {self.limits.cpu_s} s CPU budget"
            )
        return reply

    async def retire(self, why: str, *, process: _Process | None = None) -> None:
        """Replace the worker with a fresh one (after an escape attempt, even a contained one).

        With `process`, only that worker is retired: never a replacement that is still starting.
        """
        current = process if process is not None else self._current
        if current is not None and not current.dead:
            await self._kill(current, why)

    async def run_probe(
        self,
        name: str,
        params: dict[str, Any],
        *,
        timeout_s: float = 60.0,
        cpu_budget_s: float | None = None,
        retire: bool = False,
    ) -> dict[str, Any]:
        """Run one escape probe (probes.py) inside the worker, exactly where a batch would run.
        Returns what the probe saw; raises WorkerCrashed when the sandbox killed the worker, which for
        some probes is the containment. `retire` replaces the worker afterwards either way."""
        async with self._batch_lock:
            self._last_served = None
            try:
                reply = await self._request(
                    {"type": "run_probe", "name": name, "params": params},
                    timeout_s,
                    cpu_budget_s=cpu_budget_s,
                )
            finally:
                if retire and self._last_served is not None:
                    await self.retire(f"escape probe {name} ran in it", process=self._last_served)
        if reply.get("type") == "error":
            raise WorkerError(str(reply.get("reason", "probe failed")), retryable=False)
        return dict(reply.get("result") or {})

    async def probe_network(self, host: str, port: int) -> bool:
        """Ask the worker to connect to host:port; True means it is NOT network-isolated."""
        async with self._batch_lock:
            reply = await self._request({"type": "probe", "addr": f"{host}:{port}"}, 30.0)
        return bool(reply.get("net_reachable", True))

    # ---- batches ----------------------------------------------------------

    async def embed(
        self,
        *,
        model_dir: Path,
        model_sha256: str,
        inputs: list[str],
        timeout_s: float | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> EmbedResult:
        """Run one batch. Batches queue on a FIFO lock: the worker sees one at a time, so a queued
        batch can still be cancelled and the compute time is the batch's own."""
        if self.allow_probes and inputs and inputs[0].startswith(PROBE_TASK_PREFIX):
            from hearth_agent.selftest import probe_task

            if on_start is not None:
                on_start()
            raise await probe_task(self, inputs[0].removeprefix(PROBE_TASK_PREFIX))
        async with self._batch_lock:
            if on_start is not None:
                on_start()
            request = {
                "type": "embed",
                "model_dir": str(model_dir),
                "model_sha256": model_sha256,
                "inputs": inputs,
            }
            reply = await self._request(request, timeout_s)
        if reply.get("type") == "error":
            raise WorkerError(
                str(reply.get("reason", "worker error")), retryable=bool(reply.get("retryable", True))
            )
        self.warm_models = [str(m) for m in reply.get("warm", [])]
        self._model_dirs[model_sha256] = model_dir
        raw = base64.b64decode(reply["embeddings_b64"])
        return EmbedResult(
            embeddings=raw,
            count=int(reply["count"]),
            dimension=int(reply["dimension"]),
            compute_ms=float(reply["compute_ms"]),
            load_ms=float(reply.get("load_ms", 0.0)),
            model_loads=int(reply.get("model_loads", 0)),
            device=str(reply.get("device", "cpu")),
        )

    def _restart_soon(self) -> None:
        """Bring a fresh worker up now rather than on the next batch, so it is warm again: imports
        done and the models the old worker had loaded loaded again."""
        warm = [(sha, self._model_dirs[sha]) for sha in self.warm_models if sha in self._model_dirs]

        async def restart() -> None:
            await asyncio.sleep(0.5)  # a worker that dies at once must not spin the CPU
            try:
                await self.start()
                for sha, model_dir in warm:
                    await self.embed(model_dir=model_dir, model_sha256=sha, inputs=[], timeout_s=300.0)
            except Exception as exc:  # a background task has no caller to raise to
                log.error("could not restart the worker: %s", exc)

        task = asyncio.create_task(restart())
        self._restarts.add(task)
        task.add_done_callback(self._restarts.discard)
