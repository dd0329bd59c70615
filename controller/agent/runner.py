"""Wire the agent to the real world: ExaBGP on stdin/stdout, the kernel, the metrics port."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from collections.abc import Callable

from prometheus_client import CollectorRegistry, start_http_server

from ..bgp.speaker import ExaBGPSpeaker
from ..config.agent import insecure_urls
from ..config.model import AgentConfig
from ..metrics.agent import AgentMetrics
from ..sdnotify import Notifier
from .daemon import Agent, install_signal_handlers
from .local_status import StatusServer, socket_path
from .plan_client import PlanClient

log = logging.getLogger("controller.agent")


async def run_agent(config: AgentConfig, load_config: Callable[[], AgentConfig], *,
                    no_kernel: bool = False, netns: str | None = None) -> int:
    holder: dict[str, Agent] = {}

    def on_event(event: object) -> None:
        if "agent" in holder:
            try:
                holder["agent"].on_event(event)
            except Exception:  # noqa: BLE001 - a bad message must not stop the reader (and the agent)
                log.exception("handling a message from ExaBGP failed; ignoring it: %r", event)

    speaker = await ExaBGPSpeaker.connect_stdio(on_event=on_event)
    if os.path.exists(os.path.join(config.state_dir, "stopping")):
        return await _idle_until_stopped(speaker)
    kernel = None
    if config.kernel.enabled and not no_kernel:
        from ..kernel.netlink import KernelAdapter

        kernel = KernelAdapter(protocol=config.kernel.protocol, table=config.kernel.table, netns=netns)
    registry = CollectorRegistry()
    client: PlanClient | None = None
    if config.controller is not None:
        link = config.controller
        client = PlanClient.from_token_file(link.urls or (link.url,), config.pop, link.token_file, config.state_dir,
                                            config.allowed_prefixes, link.timeout, link.tls, link.plan_keys)
        client.cache_later = True  # (follow_plans caches each plan after applying it, off the event loop)
        for url in insecure_urls(link):  # at every start; anycast_agent_controller_insecure_http says it too
                log.warning("INSECURE: controller.insecure_plain_http is set: %s is plain HTTP, the POP's token "
                            "and plans cross the network in clear; use https:// (README, Security)", url)
    cached = client.load_cached(config.controller.max_plan_age) if client and config.controller else None
    if cached is not None:
        log.info("starting from the cached plan generation %d (revision %s) until the controller answers",
                 cached.generation, cached.revision)
    agent = Agent(config, load_config, speaker, kernel=kernel,
                  metrics=lambda snap: AgentMetrics(registry, snap), notifier=Notifier(),
                  initial_plan=cached, controller=client)
    holder["agent"] = agent
    freeze_startup_heap()
    if config.metrics_listen:
        host, port = config.metrics_listen
        try:
            start_http_server(port, addr=host, registry=registry)
            log.info("metrics on http://%s:%d/metrics", host if ":" not in host else f"[{host}]", port)
        except OSError as exc:
            # Metrics are for humans; announcing the VIPs right matters more.
            log.error("cannot serve metrics on %s:%d: %s", host, port, exc)
    install_signal_handlers(agent, asyncio.get_running_loop())
    _write_pid(config.state_dir)
    status = StatusServer(socket_path(config.state_dir), agent.snapshot)
    try:
        await status.start()
    except OSError as exc:  # like metrics: the local view matters less than the routes
        log.error("cannot serve the local status on %s (anycastctl agent status): %s", status.path, exc)
    log.info("agent for POP %s started: %d VIP(s), config %s", config.pop, len(config.vips), config.source)

    async def read() -> None:
        await speaker.run_reader()
        log.warning("ExaBGP closed our stdin: it has gone away; exiting")
        agent.stop("exabgp_gone")

    reader = asyncio.create_task(read(), name="exabgp-reader")
    try:
        return await agent.run()
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await status.close()
        if kernel is not None:
            kernel.close()
        if client is not None:
            await client.close()


def freeze_startup_heap() -> None:
    """Keep what start-up built out of cyclic garbage collection (``gc.freeze``). At 10,000
    VIPs the config, the plan and every VIP's state are ~10^6 objects that live as long as the
    process, and each full collection scanned them all again: ~18 % of the first pass's CPU
    (bench.announce_rate agent-pass). Reference counting still frees them; only a cycle among
    them, once garbage, is never collected, so the most it can keep is what existed now. No
    gc.collect() first: a full collection at 10,000 VIPs costs tenths of a second on the way
    to the first announcement, to free the few cycles start-up leaves (a YAML loader's)."""
    gc.freeze()


async def _idle_until_stopped(speaker: ExaBGPSpeaker) -> int:
    """``anycast-agent stop`` ran (STATE_DIR/stopping) and ExaBGP respawned us: the service is
    stopping, so announce nothing and touch nothing until ExaBGP goes or we are told to stop.
    Exiting at once instead would only make ExaBGP respawn us again."""
    log.info("the service is stopping (STATE_DIR/stopping): announcing nothing until ExaBGP stops")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reader = asyncio.ensure_future(speaker.run_reader())
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait({reader, waiter}, return_when=asyncio.FIRST_COMPLETED)
    for task in (reader, waiter):
        task.cancel()
    await asyncio.gather(reader, waiter, return_exceptions=True)
    return 0


def _write_pid(state_dir: str) -> None:
    """For ``systemctl reload`` (SIGHUP goes to the agent, not to ExaBGP, the main PID)."""
    try:
        os.makedirs(state_dir, exist_ok=True)
        with open(os.path.join(state_dir, "agent.pid"), "w", encoding="ascii") as f:
            f.write(f"{os.getpid()}\n")
    except OSError as exc:
        log.warning("cannot write %s/agent.pid (systemctl reload will not reach the agent): %s",
                    state_dir, exc)
