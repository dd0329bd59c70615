"""The health state machine of one checked backend: pure, no I/O, no clock.

Theory of operation
-------------------
A single probe can lie: a dropped SYN, a GC pause, one slow answer. So the verdict on a
backend changes only after ``rise`` successes in a row (to healthy) or ``fall`` failures
in a row (to unhealthy). Between the two verdicts sit two phases of doubt, which keep the
old verdict while the evidence piles up::

          rise successes in a row  +------+  fall failures in a row
          +------------------------| INIT |----------------+
          v                        +------+                v
        +----+  failure  +---------+  fall-th failure   +------+  success  +--------+
        | UP |---------->| FALLING |------------------->| DOWN |---------->| RISING |
        +----+<----------+---------+     in a row       +------+<----------+--------+
          ^    success                                            failure     |
          +--------------------- rise-th success in a row --------------------+

With ``fall == 1`` a failure takes UP straight to DOWN; with ``rise == 1`` a success
takes DOWN straight to UP. The doubt phases are asymmetric on purpose: one success ends
FALLING (the backend answered, so it serves), but one failure ends RISING (a flapping
backend must prove itself ``rise`` times in a row before it gets traffic again).

The verdict, ``HealthState.healthy``: UP and FALLING are True (a backend in doubt keeps
its traffic until ``fall`` failures confirm the doubt), DOWN and RISING are False, and
INIT is None: no verdict yet. Callers must treat None as "unknown", not as "down": a
freshly started agent that withdrew everything it could not yet vouch for would be the
broken-health-check outage this product exists to avoid.

The state holds two streak counters (consecutive successes, consecutive failures; at most
one of them is non-zero after the first result) and ``since``, when the phase was entered.
``step`` looks the (phase, result) pair up in ``TRANSITIONS``, a literal table giving the
next phase while the streak is short of its threshold and once it reaches it. Time comes
in as an argument, so tests replay sequences with made-up timestamps. An invalid
``rise``/``fall`` raises ValueError; the caller's state is a frozen value, untouched.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final, Literal


class Phase(enum.StrEnum):
    """A StrEnum: the metric label and the log word are its value."""

    INIT = "init"
    RISING = "rising"
    UP = "up"
    FALLING = "falling"
    DOWN = "down"


# Why a phase changed; a log line and a metric label carry it.
TransitionReason = Literal["rise_reached", "fall_reached", "check_failed", "check_recovered"]

# (phase, probe succeeded?) -> (next phase while the streak is below its threshold,
#                               next phase once it reaches it).
# A success's streak is compared with `rise`, a failure's with `fall`.
TRANSITIONS: Final[dict[tuple[Phase, bool], tuple[Phase, Phase]]] = {
    (Phase.INIT, True): (Phase.INIT, Phase.UP),
    (Phase.INIT, False): (Phase.INIT, Phase.DOWN),
    (Phase.UP, True): (Phase.UP, Phase.UP),
    (Phase.UP, False): (Phase.FALLING, Phase.DOWN),
    (Phase.FALLING, True): (Phase.UP, Phase.UP),
    (Phase.FALLING, False): (Phase.FALLING, Phase.DOWN),
    (Phase.DOWN, True): (Phase.RISING, Phase.UP),
    (Phase.DOWN, False): (Phase.DOWN, Phase.DOWN),
    (Phase.RISING, True): (Phase.RISING, Phase.UP),
    (Phase.RISING, False): (Phase.DOWN, Phase.DOWN),
}

_VERDICT: Final[dict[Phase, bool | None]] = {
    Phase.INIT: None,
    Phase.RISING: False,
    Phase.UP: True,
    Phase.FALLING: True,
    Phase.DOWN: False,
}


@dataclass(frozen=True)
class HealthState:
    """Where one backend stands: its phase, since when, and the current streak."""

    phase: Phase
    since: float
    successes: int = 0  # consecutive successful checks up to now
    failures: int = 0  # consecutive failed checks up to now

    @property
    def healthy(self) -> bool | None:
        """True: serves traffic; False: does not; None: no verdict yet (INIT)."""
        return _VERDICT[self.phase]


@dataclass(frozen=True)
class Transition:
    """A phase change, for logs, metrics and the controller's explanations."""

    from_phase: Phase
    to_phase: Phase
    at: float
    reason: TransitionReason
    detail: str  # the detail of the probe result that caused it


def initial(now: float) -> HealthState:
    """A backend nobody has checked yet."""
    return HealthState(Phase.INIT, now)


def step(
    state: HealthState, ok: bool, rise: int, fall: int, now: float, detail: str = ""
) -> tuple[HealthState, Transition | None]:
    """Feed one probe result; return the new state, and the transition if the phase changed."""
    if rise < 1 or fall < 1:
        raise ValueError(f"rise and fall must be at least 1, got rise={rise} fall={fall}")
    if ok:
        successes, failures = state.successes + 1, 0
        reached = successes >= rise
    else:
        successes, failures = 0, state.failures + 1
        reached = failures >= fall
    below, at_threshold = TRANSITIONS[(state.phase, ok)]
    to = at_threshold if reached else below
    if to is state.phase:
        # Built directly, not with dataclasses.replace (several times slower): once per check.
        return HealthState(state.phase, state.since, successes, failures), None
    reason: TransitionReason
    if reached and below is not at_threshold:
        reason = "rise_reached" if ok else "fall_reached"
    else:
        reason = "check_recovered" if ok else "check_failed"
    return (
        HealthState(to, now, successes, failures),
        Transition(state.phase, to, now, reason, detail),
    )
