"""The `hearth-agent` command line: `enroll` a machine, `run` the agent. Exit codes: 0 ok,
1 enrollment failed, 2 not enrolled / bad usage, 3 the server refused this agent for good,
4 the worker could not be started."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from hearth_agent import __version__
from hearth_agent.config import ConfigError, cache_dir, config_dir, config_load, config_path, policy_path
from hearth_agent.sandbox import SANDBOX_MODES

if TYPE_CHECKING:
    from hearth_agent.cheat import Cheats

log = logging.getLogger("hearth_agent")

EXIT_ENROLL_FAILED = 1
EXIT_USAGE = 2
EXIT_REFUSED = 3
EXIT_WORKER = 4


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        stream=sys.stdout,
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # websockets logs every frame at DEBUG; that is noise even in verbose mode.
    logging.getLogger("websockets").setLevel(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)


def _home(args: argparse.Namespace) -> Path | None:
    return Path(args.home).expanduser().resolve() if args.home else None


def _warn_cheating(cheats: Cheats) -> None:
    banner = "!" * 78
    log.warning(banner)
    log.warning("$HEARTH_AGENT_CHEAT=%s: THIS AGENT LIES TO THE SERVER (tests only)", cheats.describe())
    log.warning(banner)


def cmd_enroll(args: argparse.Namespace) -> int:
    from hearth_agent.enroll import EnrollError, agent_enroll

    home = _home(args)
    existing = config_path(home)
    if existing.exists() and not args.force:
        print(
            f"this machine is already enrolled ({existing}); pass --force to enroll it again", file=sys.stderr
        )
        return EXIT_USAGE
    try:
        config, path = agent_enroll(server_url=args.server, token=args.token, name=args.name, home=home)
    except EnrollError as exc:
        print(f"enrollment failed: {exc}", file=sys.stderr)
        return EXIT_ENROLL_FAILED
    print(
        f"enrolled as host {config.host_id} ({config.name}) with {config.server_url}; config saved to {path}"
    )
    return 0


async def _run_agent(args: argparse.Namespace) -> int:
    from hearth_agent.connection import Agent, AgentStopped
    from hearth_agent.supervisor import WorkerError

    home = _home(args)
    try:
        config = config_load(home=home)
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    threads = args.threads or (
        int(os.environ["HEARTH_WORKER_THREADS"]) if os.environ.get("HEARTH_WORKER_THREADS") else None
    )
    from hearth_agent.cheat import cheats_from_env, worker_env
    from hearth_agent.worker import DTYPE_ENV, worker_dtype

    try:
        dtype = worker_dtype(
            {DTYPE_ENV: args.worker_dtype or os.environ.get(DTYPE_ENV) or config.worker_dtype}
        )
        cheats = cheats_from_env(os.environ)
    except ValueError as exc:
        print(f"hearth-agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if not cheats.honest:
        _warn_cheating(cheats)
    # The supervisor hands HEARTH_WORKER_* from this process's environment to every worker it starts.
    os.environ.update({DTYPE_ENV: dtype, **worker_env(cheats)})
    from hearth_agent.energy.sites import SiteConfigError, energy_monitor

    try:
        energy = energy_monitor(
            config, policy_path=policy_path(home), site=args.site, sim_source=args.site_sim
        )
    except SiteConfigError as exc:
        print(f"hearth-agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    agent = Agent(
        config,
        cache_root=cache_dir(home),
        slots=args.slots,
        sandbox=args.sandbox,
        hidden_paths=[config_dir(home)],
        threads=threads,
        energy=energy,
    )
    log.info(
        "hearth-agent %s: host %s (%s) → %s, slots=%d, cache=%s",
        __version__,
        config.host_id,
        config.name,
        agent.url,
        agent.slots,
        agent.cache.root,
    )
    main_task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        if main_task is not None:
            loop.add_signal_handler(signum, main_task.cancel)
    from hearth_agent.control import AgentAlreadyRunning, control_serve

    try:
        await control_serve(agent, directory=config_dir(home))
    except AgentAlreadyRunning as exc:
        print(f"hearth-agent: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except asyncio.CancelledError:
        log.info("stopped by signal")
        return 0
    except AgentStopped as exc:
        log.error("%s", exc)
        print(f"hearth-agent: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    except (WorkerError, RuntimeError) as exc:
        log.error("the worker could not be started: %s", exc)
        print(f"hearth-agent: the worker could not be started: {exc}", file=sys.stderr)
        return EXIT_WORKER
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    return asyncio.run(_run_agent(args))


def cmd_selftest(args: argparse.Namespace) -> int:
    from hearth_agent.selftest import cmd_selftest as selftest

    return selftest(args, hidden_paths=[config_dir(_home(args))])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hearth-agent", description="Hearth host agent")
    parser.add_argument("--version", action="version", version=f"hearth-agent {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    home_help = (
        "config dir (default: $HEARTH_AGENT_HOME or ~/.config/hearth-agent); the cache goes under it too"
    )

    enroll = sub.add_parser("enroll", help="exchange an enrollment token for this machine's host token")
    enroll.add_argument("--server", required=True, help="server base URL, e.g. https://hearth.example")
    enroll.add_argument("--token", required=True, help="one-time enrollment token from the host dashboard")
    enroll.add_argument("--name", help="machine name shown on the dashboard (default: hostname)")
    enroll.add_argument("--home", help=home_help)
    enroll.add_argument("--force", action="store_true", help="replace an existing enrollment")
    enroll.set_defaults(func=cmd_enroll)

    run = sub.add_parser("run", help="connect to the server and serve tasks")
    run.add_argument("--home", help=home_help)
    run.add_argument("--slots", type=int, help="tasks held at once (default from config: 2)")
    run.add_argument(
        "--sandbox",
        choices=SANDBOX_MODES,
        default=os.environ.get("HEARTH_AGENT_SANDBOX", "auto"),
        help="worker isolation (default auto: bwrap, else unshare -rn, else none)",
    )
    run.add_argument(
        "--threads", type=int, help="torch threads in the worker (default $HEARTH_WORKER_THREADS)"
    )
    from hearth_agent.worker import DTYPES

    run.add_argument(
        "--worker-dtype",
        choices=DTYPES,
        help="precision the worker's encoder runs in (default $HEARTH_WORKER_DTYPE, else the config's, "
        "else float32); bfloat16 is faster on CPUs that have it, its vectors differ slightly",
    )
    run.add_argument(
        "--site",
        choices=("none", "simulator", "powerwall"),
        help="the home site to read (default $HEARTH_SITE, else the config's site, else none)",
    )
    run.add_argument(
        "--site-sim",
        metavar="JSON_OR_FILE",
        help='simulator parameters, e.g. \'{"soc_pct": 22, "time_scale": 600}\' (default $HEARTH_SITE_SIM)',
    )
    run.set_defaults(func=cmd_run)

    selftest = sub.add_parser(
        "selftest", help="run escape probes in the real sandbox; exit 0 only if all were contained"
    )
    selftest.add_argument("--home", help=home_help)
    selftest.add_argument("--json", action="store_true", help="print one JSON object (logs go to stderr)")
    selftest.add_argument(
        "--sandbox", choices=SANDBOX_MODES, default=os.environ.get("HEARTH_AGENT_SANDBOX", "auto")
    )
    selftest.set_defaults(func=cmd_selftest)

    from hearth_agent.owner_cli import owner_commands_add

    owner_commands_add(sub, home_help=home_help)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    if getattr(args, "slots", None) is not None and not 1 <= args.slots <= 64:
        parser.error("--slots must be between 1 and 64")
    code: int = args.func(args)
    return code
