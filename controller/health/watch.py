"""The life of one watch connection to a backend: pure, no I/O, no clock.

Theory of operation
-------------------
Polling finds a crashed backend only at its next check, and ``fall`` checks later it is
down: (fall - 1) intervals at best. But a crash speaks: the kernel of the backend's host
resets every connection of the dead process (RST), and a process that exits or stops
closes them (FIN). So the agent keeps one idle TCP connection open to each backend (a
*watch*), and when it is lost the scheduler runs ``fall`` confirmation probes back to
back: a crashed backend is down in milliseconds whatever the interval.

The watch is a hint, never a verdict. It sends nothing and expects nothing; only the
probes' results move the health state machine (``health.state``), so a watch that cannot
connect, or that a server closes for being idle, costs at most one round of confirmation
probes, which succeed. A blackhole (a cable cut, a firewall drop) produces no event on an
idle connection: the periodic probes, which keep running, find it as before::

                  Connected                      Lost (-> Confirm)
    +------------+ --------> +-----------+ ----------------------------+
    | CONNECTING |           | CONNECTED |  lived >= STABLE_AFTER:      |
    +------------+ <-------- +-----------+  reconnect at once (Connect) |
      |   ^  ^                                                         |
      |   |  +---------------------------------------------------------+
      |   | Timer (Connect)    +---------+
      |   +------------------- | BACKOFF | <-- Lost of a short-lived connection (-> Confirm),
      |     or ProbeSucceeded  +---------+     or ConnectFailed
      +---------------------->  after ConnectFailed
           ConnectFailed

``attempts`` counts connections in a row that failed or did not last ``STABLE_AFTER``;
the wait in BACKOFF doubles with it from ``BACKOFF_BASE`` up to ``BACKOFF_MAX``. So a
backend that is down, or a server that closes every idle connection at once, costs one
connect (and for the latter one round of confirmations) every ``BACKOFF_MAX`` seconds,
and a healthy backend whose connection was reset is watched again within milliseconds.

A backend that comes back after a crash must not stay unwatched for a whole backoff: a
successful probe (``ProbeSucceeded``) ends a BACKOFF that connect failures caused, and the
watch connects again at once. It does not end one caused by a connection that closed
early: a server that closes idle connections at once would otherwise turn each
confirmation's success into a new connection, a new loss and a new confirmation, in a loop.

``step(state, event, now)`` returns the new state, the effects for the I/O shell
(``health.watcher``) and when to deliver the next ``Timer`` (None: no timer). An event
that cannot happen in a phase (the shell's bug) raises ValueError; the caller's state is
a frozen value, untouched.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Final

BACKOFF_BASE: Final = 0.1  # seconds: the first wait after a failed or short-lived connection
BACKOFF_MAX: Final = 10.0  # the longest wait between two connects
# A connection that lived this long was a real one: its loss resets the backoff. Short, so
# that a backend crashing soon after a restart still gets its watch back at once; a server
# that closes idle connections takes seconds (nginx, Apache, cloud load balancers: 20-60 s).
STABLE_AFTER: Final = 0.5


class WatchPhase(enum.StrEnum):
    CONNECTING = "connecting"
    CONNECTED = "connected"
    BACKOFF = "backoff"


class LossKind(enum.StrEnum):
    """How an established watch connection ended; the confirmation's log word."""

    RESET = "reset"  # RST: the process died, or the host refuses the connection now
    EOF = "eof"  # FIN: the process exited or closed it (an idle timeout, a graceful stop)
    ERROR = "error"  # another socket error (a keepalive timeout, an ICMP unreachable)


@dataclass(frozen=True)
class WatchState:
    phase: WatchPhase
    since: float  # when the phase was entered
    attempts: int = 0  # connections in a row that failed or did not last STABLE_AFTER
    refused: bool = False  # in BACKOFF: the last attempt failed to connect (not a short-lived connection)


# --- events, from the I/O shell ---------------------------------------------------------------
@dataclass(frozen=True)
class Connected:
    """The TCP handshake completed."""


@dataclass(frozen=True)
class ConnectFailed:
    detail: str  # "connect refused", "connect timed out"


@dataclass(frozen=True)
class Lost:
    kind: LossKind
    detail: str


@dataclass(frozen=True)
class Timer:
    """The wait of BACKOFF is over."""


@dataclass(frozen=True)
class ProbeSucceeded:
    """A probe of this endpoint succeeded: it accepts connections again. Valid in any phase."""


WatchEvent = Connected | ConnectFailed | Lost | Timer | ProbeSucceeded


# --- effects, for the I/O shell ---------------------------------------------------------------
@dataclass(frozen=True)
class Connect:
    """Open a new connection (the previous one, if any, is already closed)."""


@dataclass(frozen=True)
class Confirm:
    """An established connection was lost: probe the backend now, ``fall`` times back to back."""

    kind: LossKind
    detail: str
    lived: float  # seconds the connection was up


WatchEffect = Connect | Confirm


def initial(now: float) -> tuple[WatchState, tuple[WatchEffect, ...]]:
    """A new watch: connect at once."""
    return WatchState(WatchPhase.CONNECTING, now), (Connect(),)


def backoff(attempts: int) -> float:
    """Seconds to wait after ``attempts`` failed or short-lived connections in a row (>= 1)."""
    return min(BACKOFF_MAX, BACKOFF_BASE * float(2 ** min(attempts - 1, 16)))


def step(state: WatchState, event: WatchEvent, now: float
         ) -> tuple[WatchState, tuple[WatchEffect, ...], float | None]:
    """Feed one event; return (new state, effects, when to deliver the next Timer or None)."""
    phase = state.phase
    if phase is WatchPhase.CONNECTING and isinstance(event, Connected):
        return WatchState(WatchPhase.CONNECTED, now, state.attempts), (), None
    if phase is WatchPhase.CONNECTING and isinstance(event, ConnectFailed):
        return _back_off(state.attempts + 1, now, (), refused=True)
    if phase is WatchPhase.CONNECTED and isinstance(event, Lost):
        lived = now - state.since
        confirm = (Confirm(event.kind, event.detail, lived),)
        if lived >= STABLE_AFTER:
            # A real connection went away: the backend may have restarted at once, so watch
            # it again now (the confirmation probes decide whether it is down).
            return WatchState(WatchPhase.CONNECTING, now, 0), (*confirm, Connect()), None
        return _back_off(state.attempts + 1, now, confirm, refused=False)
    if phase is WatchPhase.BACKOFF and (isinstance(event, Timer) or (isinstance(event, ProbeSucceeded)
                                                                     and state.refused)):
        return replace(state, phase=WatchPhase.CONNECTING, since=now, refused=False), (Connect(),), None
    if isinstance(event, ProbeSucceeded):
        return state, (), None  # connected, connecting, or backing off after an early close
    raise ValueError(f"watch: {type(event).__name__} cannot happen while {phase.value}")


def _back_off(attempts: int, now: float, effects: tuple[WatchEffect, ...], refused: bool
              ) -> tuple[WatchState, tuple[WatchEffect, ...], float]:
    return WatchState(WatchPhase.BACKOFF, now, attempts, refused), effects, now + backoff(attempts)
