"""The owner's commands beside `enroll` and `run`: `status`, `drain`, `benchmark`, `uninstall`.
Exit codes: 0 ok, 2 not enrolled / bad usage, 5 the agent is not running (status, drain),
6 the owner said no (uninstall), 7 a benchmark could not run."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hearth_agent.config import ConfigError, cache_dir, config_dir, config_load, policy_path

if TYPE_CHECKING:
    from hearth_agent.protocol import BenchmarkReport

EXIT_USAGE = 2
EXIT_NOT_RUNNING = 5
EXIT_DECLINED = 6
EXIT_BENCHMARK = 7

UNIT_NAME = "hearth-agent.service"
# What the agent itself writes in its config dir and cache; uninstall removes these and nothing else.
CONFIG_FILES = ("config.json", "state.json", "agent.sock", "energy-policy.json")
CACHE_ENTRIES = ("blobs", "models", "manifests", "benchmarks")


def _home(args: argparse.Namespace) -> Path | None:
    return Path(args.home).expanduser().resolve() if args.home else None


def _policy_text(policy: dict[str, Any] | None) -> str:
    if not policy:
        return "default (the server has not pushed one yet)"
    hours = policy.get("allowed_hours") or []
    parts = [
        f"v{policy.get('version', 0)}",
        f"battery reserve {policy.get('battery_reserve_pct', 0):.0f}%",
        "solar surplus only" if policy.get("solar_surplus_only") else "any power source",
        f"hours {','.join(str(h) for h in hours)}" if hours else "any hour",
        f"GPU cap {policy['max_gpu_watts']} W" if policy.get("max_gpu_watts") else "no GPU cap",
        f"price {policy.get('price_per_1k_items_minor', 0)} per 1k items (minor units)",
    ]
    return ", ".join(parts)


def _saved_policy(home: Path | None) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(policy_path(home).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data


# ---- status -----------------------------------------------------------------


def cmd_status(args: argparse.Namespace) -> int:
    from hearth_agent.control import ControlError, control_request, state_read, status_render

    home = _home(args)
    try:
        config = config_load(home=home)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    directory = config_dir(home)
    try:
        state: dict[str, Any] | None = control_request(directory, {"command": "status"})["state"]
        live, why = True, ""
    except ControlError as exc:
        state, live, why = state_read(directory), False, str(exc)
    policy = (state or {}).get("policy") if live else _saved_policy(home)
    if args.json:
        print(json.dumps({"running": live, "why_not": why or None, "state": state}, indent=2))
    else:
        print(status_render(state=state, live=live, config=config, policy=_policy_text(policy)))
    return 0 if live else EXIT_NOT_RUNNING


# ---- drain ------------------------------------------------------------------


def cmd_drain(args: argparse.Namespace) -> int:
    from hearth_agent.control import ControlError, control_request

    directory = config_dir(_home(args))
    if args.resume:
        request: dict[str, Any] = {"command": "resume", "reason": args.reason or "the owner resumed"}
        wait_s = 30.0
    else:
        reason = args.reason or "the owner is using the machine"
        request = {"command": "drain", "reason": reason, "timeout_s": args.timeout}
        wait_s = args.timeout + 30.0
    try:
        reply = control_request(directory, request, timeout_s=wait_s)
    except ControlError as exc:
        print(f"hearth-agent: {exc}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    told = "" if reply.get("told_server") else " (not connected: the server is told on reconnect)"
    if args.resume:
        print(f"resumed: taking work again{told}")
    else:
        released = reply.get("released", [])
        print(f"drained: no new work; {len(released)} lease(s) handed back to the server{told}")
        print("take work again with: hearth-agent drain --resume")
    return 0


# ---- benchmark --------------------------------------------------------------


def cmd_benchmark(args: argparse.Namespace) -> int:
    from hearth_agent.benchmark import BenchmarkError, benchmark_report, benchmark_run

    home = _home(args)
    if args.json:
        # stdout carries the JSON alone; the worker's log lines go to stderr.
        for handler in logging.getLogger().handlers:
            if isinstance(handler, logging.StreamHandler) and handler.stream is sys.stdout:
                handler.setStream(sys.stderr)
    try:
        result = benchmark_run(
            cache_root=cache_dir(home),
            home=home,
            force=args.force,
            batch_sizes=args.batch_sizes,
            with_minilm=not args.hardware_only,
            seconds=args.seconds,
        )
    except BenchmarkError as exc:
        print(f"hearth-agent: benchmark failed: {exc}", file=sys.stderr)
        return EXIT_BENCHMARK
    report = benchmark_report(result)
    if args.json:
        print(json.dumps({**result, "report": report.model_dump()}, indent=2))
        return 0
    print("\n".join(benchmark_lines(result, report)))
    return 0


def benchmark_lines(result: dict[str, Any], report: BenchmarkReport) -> list[str]:
    cached = " (cached; --force to measure again)" if result.get("cached") else ""
    lines = [
        f"benchmark{cached}: {result['device']} {result['device_name']}, torch {result['torch']}",
        f"  matmul fp32: {result['matmul_fp32_gflops']:.1f} GFLOP/s (n={result['matmul_n']})",
    ]
    if result.get("matmul_half_gflops") is not None:
        lines.append(f"  matmul {result['half_dtype']}: {result['matmul_half_gflops']:.1f} GFLOP/s")
    lines += [
        f"  memory bandwidth: {result['memory_bandwidth_gbs']:.1f} GB/s (copying {result['bandwidth_mb']} MiB)",
        f"  largest allocation: {result['max_alloc_mb']} MiB",
    ]
    minilm = result.get("minilm")
    if minilm and minilm.get("items_per_s"):
        for batch, rate in minilm["items_per_s"].items():
            lines.append(f"  {minilm['model']} batch {batch}: {rate:.1f} items/s")
        lines.append(f"  tuned batch: {report.minilm_batch}")
    elif minilm is None:
        lines.append("  MiniLM: not measured (hardware only)")
    else:
        lines.append(f"  MiniLM: skipped ({minilm.get('skipped', 'no model')})")
    return lines


# ---- uninstall --------------------------------------------------------------


def _installer_venv() -> Path:
    default = Path.home() / ".local" / "share" / "hearth-agent" / "venv"
    return Path(os.environ.get("HEARTH_AGENT_VENV") or default).expanduser()


def _systemd_user() -> bool:
    if not shutil.which("systemctl"):
        return False
    probe = subprocess.run(
        ["systemctl", "--user", "show-environment"], capture_output=True, check=False, timeout=10
    )
    return probe.returncode == 0


def uninstall_plan(home: Path | None) -> tuple[list[Path], list[str]]:
    """What would be removed (only files the agent or install.sh made) and notes on what is kept."""
    remove: list[Path] = []
    notes: list[str] = []
    directory = config_dir(home)
    remove += [directory / name for name in CONFIG_FILES if (directory / name).exists()]
    cache = cache_dir(home)
    remove += [cache / name for name in CACHE_ENTRIES if (cache / name).exists()]
    unit = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "systemd" / "user" / UNIT_NAME
    if unit.exists():
        remove.append(unit)
    venv = _installer_venv()
    if (venv / "pyvenv.cfg").is_file() and (venv / "bin" / "hearth-agent").exists():
        remove.append(venv)
    elif sys.prefix != sys.base_prefix:
        notes.append(f"keeping the Python environment {sys.prefix}: install.sh did not make it")
    return remove, notes


def cmd_uninstall(args: argparse.Namespace) -> int:
    from hearth_agent.control import ControlError, control_request

    home = _home(args)
    directory = config_dir(home)
    remove, notes = uninstall_plan(home)
    unit_installed = any(p.name == UNIT_NAME for p in remove)
    if not remove:
        print("nothing to remove: no hearth-agent config, cache, unit or virtualenv found")
        return 0
    print("this removes:")
    for path in remove:
        print(f"  {path}")
    for note in notes:
        print(f"({note})")
    if not args.yes:
        if not sys.stdin.isatty():
            print("hearth-agent: not a terminal; pass --yes to uninstall", file=sys.stderr)
            return EXIT_DECLINED
        if input("remove them? [y/N] ").strip().lower() not in {"y", "yes"}:
            print("nothing removed")
            return EXIT_DECLINED

    if unit_installed and _systemd_user():
        subprocess.run(["systemctl", "--user", "disable", "--now", UNIT_NAME], check=False, timeout=60)
    try:
        state = control_request(directory, {"command": "status"})["state"]
    except ControlError:
        state = None
    if state is not None:
        print(
            f"hearth-agent: the agent is still running (pid {state['pid']}); stop it, then run uninstall again",
            file=sys.stderr,
        )
        return EXIT_USAGE

    for path in remove:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    if unit_installed and _systemd_user():
        subprocess.run(["systemctl", "--user", "daemon-reload"], check=False, timeout=60)
    for leftover in (cache_dir(home), directory):
        # Only once empty: the owner may keep their own files there.
        if leftover.is_dir() and not any(leftover.iterdir()):
            leftover.rmdir()
    print(
        "hearth-agent is uninstalled. The server still lists this machine: revoke it on the host dashboard."
    )
    return 0


# ---- parser -----------------------------------------------------------------


def owner_commands_add(sub: Any, *, home_help: str) -> None:
    status = sub.add_parser("status", help="connection, tasks, policy, isolation (works when stopped too)")
    status.add_argument("--home", help=home_help)
    status.add_argument("--json", action="store_true", help="machine-readable")
    status.set_defaults(func=cmd_status)

    drain = sub.add_parser(
        "drain", help="take the machine back: no new work, queued leases handed back, running one finished"
    )
    drain.add_argument("--home", help=home_help)
    drain.add_argument("--resume", action="store_true", help="take work again")
    drain.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="S",
        help="seconds a running batch may take to finish before it is killed and handed back (default 30)",
    )
    drain.add_argument("--reason", help="shown to the server (default: the owner is using the machine)")
    drain.set_defaults(func=cmd_drain)

    bench = sub.add_parser(
        "benchmark", help="measure matmul GFLOP/s, memory bandwidth and MiniLM items/s (cached per hardware)"
    )
    bench.add_argument("--home", help=home_help)
    bench.add_argument("--json", action="store_true", help="print the result as JSON")
    bench.add_argument("--force", action="store_true", help="measure again even if a result is cached")
    bench.add_argument(
        "--batch-sizes",
        type=lambda text: [int(b) for b in text.split(",")],
        default=[1, 8, 32],
        metavar="N,N,…",
        help="MiniLM batch sizes (default 1,8,32)",
    )
    bench.add_argument(
        "--hardware-only", action="store_true", help="matmul, bandwidth and allocation only: no MiniLM"
    )
    bench.add_argument(
        "--seconds",
        type=float,
        metavar="S",
        help="seconds per measurement (default $HEARTH_AGENT_BENCH_SECONDS, else 1)",
    )
    bench.set_defaults(func=cmd_benchmark)

    uninstall = sub.add_parser(
        "uninstall", help="stop the service and remove the agent's virtualenv, config and cache"
    )
    uninstall.add_argument("--home", help=home_help)
    uninstall.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    uninstall.set_defaults(func=cmd_uninstall)
