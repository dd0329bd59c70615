"""The agent's local, read-only status endpoint, for ``anycastctl agent status`` on the POP.

A unix socket in the agent's state dir (``STATE_DIR/agent.sock``, mode 0600): a client
connects, the agent writes one JSON document and closes. It never reads what the client
sends, so nothing can be asked of it but this document; and a unix socket has no network
clients to refuse (who may connect is the file's owner, the agent's user).

The document is built from the same ``AgentSnapshot`` the metrics collector reads, so the
status and a scrape taken at the same moment agree. ``status_document`` is pure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from .. import __version__
from ..config.model import Attributes
from ..metrics.agent import AgentSnapshot, VipSnapshot

log = logging.getLogger("controller.agent")

SOCKET_NAME = "agent.sock"
LINGER = 5.0  # seconds a client may keep the connection open after its answer
FORMAT = 1  # the document's version: a client refuses another one instead of misreading it


def socket_path(state_dir: str) -> str:
    return os.path.join(state_dir, SOCKET_NAME)


def attributes_json(a: Attributes | None) -> dict[str, Any] | None:
    if a is None:
        return None
    return {"med": a.med, "as_path_prepend": a.as_path_prepend, "communities": list(a.communities),
            "large_communities": list(a.large_communities)}


def exabgp_view(v: VipSnapshot) -> dict[str, Any]:
    """What ExaBGP holds for the VIP as far as the agent knows, and whether that is what the
    decision wants (``in_sync``; None while the decision is to hold: nothing is sent then)."""
    if v.held is not None:
        holds: bool | None = True
    elif v.held_unsure:
        holds = None  # maybe: announced by an earlier agent process, not yet corrected
    else:
        holds = False
    if v.action == "announce":
        in_sync: bool | None = holds is True and v.held == v.intended
    elif v.action == "withdraw":
        in_sync = holds is False
    else:
        in_sync = None
    return {"holds": holds, "attributes": attributes_json(v.held), "in_sync": in_sync}


def status_document(s: AgentSnapshot, now: float) -> dict[str, Any]:
    """The JSON ``anycastctl agent status --json`` prints."""
    backends: dict[str, list[dict[str, Any]]] = {}
    for b in s.backends:
        backends.setdefault(b.vip, []).append({
            "origin": b.origin, "backend": b.backend, "phase": b.phase.value,
            "last_check_ok": b.last_ok, "last_check_seconds": b.last_latency})
    return {
        "format": FORMAT,
        "pop": s.pop,
        "version": __version__,
        "now": now,
        "plan": {"source": s.plan_source, "generation": s.plan_generation, "revision": s.plan_revision},
        "controller": None if s.controller_ok is None and not s.controller_url else {
            "url": s.controller_url, "reachable": s.controller_ok},
        "config": {"last_reload_ok": s.config_last_reload_ok, "last_reload_at": s.config_last_reload_time},
        "last_reconcile_success_at": s.last_reconcile_success or None,
        "bgp": {
            "local_as": s.local_as,
            "sessions": [{"neighbor": p.address, "peer_as": p.peer_as, "local_address": p.local_address,
                          "state": {True: "up", False: "down", None: "unknown"}[s.neighbors.get(p.address)]}
                         for p in s.peers],
        },
        "vips": [{
            "name": v.name, "prefix": v.prefix, "state": v.status, "action": v.action, "reason": v.reason,
            "detail": v.detail, "origin": v.origin or None, "next_hop": v.next_hop or None,
            "intended": attributes_json(v.intended), "exabgp": exabgp_view(v),
            "backends": backends.get(v.name, []),
        } for v in s.vips],
        # Held (or possibly held) by ExaBGP but no VIP of the current config or plan: the next
        # pass withdraws them once the plan is ready.
        "exabgp_other_prefixes": list(s.held_elsewhere),
    }


class StatusServer:
    """Serves ``status_document`` on a unix socket; ``close`` removes the socket file."""

    def __init__(self, path: str, snapshot: Callable[[], AgentSnapshot],
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self._snapshot = snapshot  # read per connection, as a scrape reads it
        self._clock = clock
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)  # a socket left by an agent that died: nobody listens on it
        old = os.umask(0o177)  # born 0600, not chmod-ed after a window where others could connect
        try:
            self._server = await asyncio.start_unix_server(self._answer, path=self.path)
        finally:
            os.umask(old)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            writer.write(json.dumps(status_document(self._snapshot(), self._clock())).encode() + b"\n")
            writer.write_eof()
            await writer.drain()
            # Whatever the client sent is read only to be dropped, never looked at: closing
            # with unread data would reset the connection before the client read its answer.
            async with asyncio.timeout(LINGER):
                while await reader.read(1 << 16):
                    pass
        except (ConnectionError, OSError, TimeoutError):
            pass  # the client went away or lingers: its problem
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await writer.wait_closed()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
