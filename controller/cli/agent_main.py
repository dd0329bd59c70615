"""``anycast-agent``: the POP agent.

    anycast-agent launch --config /etc/anycast/agent.yaml       # what systemd runs
    anycast-agent exabgp-config --config /etc/anycast/agent.yaml  # print ExaBGP's config
    anycast-agent run --config /etc/anycast/agent.yaml           # ExaBGP's API process

``launch`` renders ExaBGP's config from the agent config and replaces itself with
``exabgp server``, which runs ``anycast-agent run`` as its API process. So ExaBGP is the
service's main process: if the agent dies, ExaBGP respawns it and keeps the routes; if
ExaBGP dies, the session drops, the agent sees EOF and exits, and systemd restarts both.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence

from .. import logs
from ..agent import config_handoff
from ..bgp.exabgp_config import NeighborSpec, exabgp_environment, render_exabgp_config
from ..config.agent import parse_agent_config
from ..config.errors import ConfigError
from ..config.model import AgentConfig
from ..config.reader import read_text
from . import event_loop
from .conventions import add_log_level, new_parser

log = logging.getLogger("controller.agent")


def _parser() -> argparse.ArgumentParser:
    p = new_parser("anycast-agent", "BGP anycast POP agent")
    sub = p.add_subparsers(dest="command", required=True)
    for name, help_ in (("run", "run as ExaBGP's API process (stdin/stdout)"),
                        ("exabgp-config", "print the ExaBGP config for this agent"),
                        ("launch", "render the ExaBGP config and exec ExaBGP (systemd's ExecStart)"),
                        ("stop", "stop the agent before ExaBGP, so its planned withdrawal completes "
                                 "(systemd's ExecStop)")):
        s = sub.add_parser(name, help=help_)
        s.add_argument("--config", "-c", required=True, help="agent YAML config")
        s.add_argument("--state-dir", help="override state_dir from the config")
        s.add_argument("--metrics-listen", help="override metrics.listen (ADDRESS:PORT, or 'off')")
        add_log_level(s)
        if name == "run":
            s.add_argument("--no-kernel", action="store_true", help="do not touch kernel routes/addresses")
            s.add_argument("--netns", help="manage kernel state in this named network namespace")
        if name in ("exabgp-config", "launch"):
            s.add_argument("--out", help="write the ExaBGP config here (launch: default STATE_DIR/exabgp.conf)")
        if name == "stop":
            s.add_argument("--timeout", type=float, default=15.0,
                           help="seconds to wait for the agent to finish (default 15)")
        if name == "launch":
            s.add_argument("--exabgp", default=os.path.join(os.path.dirname(sys.executable), "exabgp"),
                           help="the exabgp executable")
            s.add_argument("--exabgp-log", help="ExaBGP's log file (default: its stderr)")
    return p


def _overrides(args: argparse.Namespace) -> list[str]:
    """The same overrides, passed on to the API process ExaBGP starts."""
    out: list[str] = []
    if args.state_dir:
        out += ["--state-dir", args.state_dir]
    if args.metrics_listen:
        out += ["--metrics-listen", args.metrics_listen]
    return out


def load(args: argparse.Namespace, text: str | None = None) -> AgentConfig:
    """The config file (``text``: as just read) with the command line's overrides."""
    config = parse_agent_config(read_text(args.config) if text is None else text, source=args.config)
    if args.state_dir:
        config = dataclasses.replace(config, state_dir=args.state_dir)
    if args.metrics_listen:
        listen = None
        if args.metrics_listen != "off":
            host, _, port = args.metrics_listen.rpartition(":")
            listen = (host.strip("[]"), int(port))
        config = dataclasses.replace(config, metrics_listen=listen)
    return config


def exabgp_config_text(config: AgentConfig, args: argparse.Namespace) -> str:
    neighbors = [
        NeighborSpec(address=str(n.address), local_address=str(n.local_address), router_id=str(n.router_id),
                     local_as=config.local_as, peer_as=n.peer_as, hold_time=n.hold_time,
                     md5_password=n.md5_password, passive=n.passive,
                     graceful_restart=config.graceful_restart)
        for n in config.neighbors
    ]
    argv = [sys.executable, "-m", "controller.cli.agent_main", "run", "--config", os.path.abspath(args.config),
            *_overrides(args), "--log-level", args.log_level]
    return render_exabgp_config(neighbors, "anycast-agent", argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.setup("anycast-agent", args.log_level)
    try:
        text = read_text(args.config)
        # ExaBGP's API process takes over the config launch loaded (config_handoff), if it
        # was built from this very text: a cold start parses it once, not twice.
        handed = config_handoff.take_over(_built_from(text, args), os.environ) if args.command == "run" else None
        config = dataclasses.replace(handed, source=args.config) if handed is not None else load(args, text)
        if handed is not None:
            log.info("config %s: taken over from launch, not parsed again", args.config)
    except ConfigError as exc:
        print(exc.summary(), file=sys.stderr)
        return 2
    if args.command in ("launch", "run"):
        try:  # (a bad ANYCAST_EVENT_LOOP fails the start with one line, before ExaBGP runs)
            event_loop.loop_factory()
        except ValueError as exc:
            print(f"anycast-agent: {exc}", file=sys.stderr)
            return 2
    if args.command == "exabgp-config":
        text = exabgp_config_text(config, args)
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                f.write(text)
        else:
            sys.stdout.write(text)
        return 0
    if args.command == "launch":
        return _launch(config, args, text)
    if args.command == "stop":
        return _stop(config, args.timeout)
    from ..agent.runner import run_agent  # imported late: the other commands need no asyncio/pyroute2

    from ..agent.controller_link import ControllerUnavailable

    try:
        # asyncio's loop, or uvloop when ANYCAST_EVENT_LOOP asks for it (controller.cli.event_loop).
        return event_loop.run(run_agent(config, lambda: load(args), no_kernel=args.no_kernel, netns=args.netns))
    except ControllerUnavailable as exc:  # only raised at start-up: the token cannot be read
        print(f"{args.config}: controller: {exc}", file=sys.stderr)
        return 2


def stopping_marker(state_dir: str) -> str:
    """Present from ``anycast-agent stop`` until the next ``launch``: an agent ExaBGP respawns
    meanwhile announces nothing (else it could announce again what the stop withdrew)."""
    return os.path.join(state_dir, "stopping")


def _agent_pid(state_dir: str) -> int | None:
    try:
        with open(os.path.join(state_dir, "agent.pid"), encoding="ascii") as f:
            pid = int(f.read().strip())
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except (OSError, ValueError):
        return None
    # The PID file may be stale and its number reused: only signal an agent.
    return pid if b"controller.cli.agent_main" in argv and b"run" in argv else None


def _stop(config: AgentConfig, timeout: float) -> int:
    """SIGTERM the agent and wait for it: it withdraws (graceful shutdown first, if set) and
    removes its kernel state while ExaBGP still runs; systemd then stops ExaBGP."""
    os.makedirs(config.state_dir, exist_ok=True)
    with open(stopping_marker(config.state_dir), "w", encoding="ascii") as f:
        f.write(f"{time.time():.0f}\n")
    pid = _agent_pid(config.state_dir)
    if pid is None:
        log.info("no agent is running")
        return 0
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", encoding="ascii") as f:
                if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                    return 0  # exited; ExaBGP reaps it
        except OSError:
            return 0
        time.sleep(0.05)
    log.warning("the agent (PID %d) did not finish within %.0f s; ExaBGP is stopped anyway", pid, timeout)
    return 0


def _built_from(text: str, args: argparse.Namespace) -> bytes:
    return config_handoff.identity(text, _overrides(args))


def _launch(config: AgentConfig, args: argparse.Namespace, text: str) -> int:
    if config.kernel.enabled:
        from ..kernel.claim import RouteProtocolInUse, claim_route_protocol

        try:
            claim = claim_route_protocol(config.kernel.protocol)
        except RouteProtocolInUse as exc:
            print(f"{args.config}: {exc}", file=sys.stderr)
            return 2
        # Kept open across the exec: ExaBGP, the service's main process, holds the claim for
        # the life of the service (and the kernel drops it when ExaBGP dies).
        os.set_inheritable(claim.fileno(), True)
    os.makedirs(config.state_dir, exist_ok=True)
    try:
        os.unlink(stopping_marker(config.state_dir))
    except FileNotFoundError:
        pass
    out = args.out or os.path.join(config.state_dir, "exabgp.conf")
    with open(out, "w", encoding="utf-8") as f:
        f.write(exabgp_config_text(config, args))
    env = dict(os.environ)
    env.update(exabgp_environment(args.exabgp_log))
    env.update(config_handoff.hand_over(config.state_dir, config, _built_from(text, args)))
    log.info("starting ExaBGP with %s", out)
    os.execve(args.exabgp, [args.exabgp, "server", out], env)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(main())
