"""The worker's sandbox, checked from outside: a loopback listener opened here must be unreachable
from inside, and the isolation the supervisor reports must be what the sandbox really gave."""

from __future__ import annotations

import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from hearth_agent.supervisor import WorkerSupervisor

from .conftest import LoopThread, WarmWorker


def _works(command: list[str]) -> bool:
    if shutil.which(command[0]) is None:
        return False
    return subprocess.run([*command, "true"], capture_output=True, check=False).returncode == 0


BWRAP_WORKS = _works(["bwrap", "--unshare-net", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"])
UNSHARE_WORKS = _works(["unshare", "--map-root-user", "--net"])


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4)
    sock.settimeout(0.5)
    yield sock
    sock.close()


def _nobody_connected(sock: socket.socket) -> bool:
    try:
        conn, _ = sock.accept()
    except TimeoutError:
        return True
    conn.close()
    return False


@pytest.mark.skipif(
    not (BWRAP_WORKS or UNSHARE_WORKS), reason="neither bwrap nor unshare -rn works on this machine"
)
def test_the_sandboxed_worker_cannot_reach_a_loopback_listener(
    minilm_worker: WarmWorker, listener: socket.socket
) -> None:
    host, port = listener.getsockname()
    reachable = minilm_worker.loop.run(minilm_worker.supervisor.probe_network(host, port))
    assert reachable is False
    assert _nobody_connected(listener)


@pytest.mark.skipif(not BWRAP_WORKS, reason="bwrap does not work on this machine")
def test_auto_picks_bwrap_and_reports_every_layer_it_verified(minilm_worker: WarmWorker) -> None:
    info = minilm_worker.supervisor.info
    assert info is not None
    assert info.sandbox == "bwrap"
    bwrap_layers = [
        "netns:bwrap",
        "pidns:bwrap",
        "ro-root:bwrap",
        "tmpfs-tmp",
        "home-hidden:bwrap",
        "scratch-only:bwrap",
        "no-caps:bwrap",
    ]
    assert info.isolation[: len(bwrap_layers)] == bwrap_layers
    assert "seccomp" in info.isolation
    rlimits = next(layer for layer in info.isolation if layer.startswith("rlimits:"))
    assert {"as", "cpu", "fsize", "nofile"} <= set(rlimits.removeprefix("rlimits:").split(","))


def _namespace_layers(isolation: list[str]) -> list[str]:
    """The layers a sandbox kind gives (bwrap/unshare), not the ones the worker applies itself."""
    return [layer for layer in isolation if layer.endswith((":bwrap", ":unshare")) or layer == "tmpfs-tmp"]


def _start(mode: str, cache: Path) -> tuple[LoopThread, WorkerSupervisor]:
    loop = LoopThread()
    supervisor = WorkerSupervisor(cache_dir=cache, sandbox=mode)
    loop.run(supervisor.start())
    return loop, supervisor


@pytest.mark.skipif(not UNSHARE_WORKS, reason="unshare -rn does not work on this machine")
def test_unshare_gives_a_network_namespace_but_no_filesystem_layers(
    tmp_path: Path, listener: socket.socket
) -> None:
    loop, supervisor = _start("unshare", tmp_path)
    try:
        assert supervisor.info is not None
        assert _namespace_layers(supervisor.info.isolation) == ["netns:unshare"]
        # The worker confines itself whatever the sandbox: seccomp works inside unshare too.
        assert "seccomp" in supervisor.info.isolation
        assert loop.run(supervisor.probe_network(*listener.getsockname())) is False
    finally:
        loop.run(supervisor.stop())
        loop.close()
    assert _nobody_connected(listener)


def test_without_a_sandbox_the_probe_sees_the_network_and_reports_no_isolation(
    tmp_path: Path, listener: socket.socket
) -> None:
    # The control: proves the probe can fail, so the isolated results above mean something.
    loop, supervisor = _start("none", tmp_path)
    try:
        assert supervisor.info is not None and _namespace_layers(supervisor.info.isolation) == []
        assert loop.run(supervisor.probe_network(*listener.getsockname())) is True
    finally:
        loop.run(supervisor.stop())
        loop.close()
    assert not _nobody_connected(listener)
