"""Whether a VIP's withdrawal waits for the controller's answer: pure, no I/O, no clock.

Theory of operation
-------------------
A check that fails at every POP at once more likely means the checks are broken than
the origin, and withdrawing everywhere would be the outage. So when a POP sees the
active origin of a VIP go down and a controller is reachable, it reports at once and
holds the VIP (``awaiting_controller``) for at most ``confirm_timeout`` while the plan
answers: ``backend_down`` for this POP means "go, withdraw", ``safety_hold`` means "keep
announcing". An unreachable controller cannot answer, so nobody waits for it (static
stability): the agent goes by its own verdict at once.

One VIP's wait is a three-phase machine, fed once per reconcile pass (``Checked``) and
whenever a plan that held the VIP is replaced (``HoldReplaced``)::

                   down                   the plan holds it
      +-------+ ----------> +------+ -----------------------> +------+
      | CLEAR |             | DOWN |                          | HELD |
      +-------+ <---------- +------+ <----------------------- +------+
        |   ^    not down               the hold lifted and     |  ^
        |   |                           still down: wait anew   |  |
        |   +------------------------ not down -----------------+  |
        +--------------------- down and held ----------------------+

``since`` is when the phase was entered: in DOWN, when the wait started. It is kept
while the phase stays, so a pass that sees the VIP down again does not extend the wait.
A safety hold is the controller's answer: when it lifts (HELD -> DOWN) the controller
gets a new ``confirm_timeout`` to confirm, instead of the agent going on its own at once
because the first failure is long past. The wait is counted from the failure even while
the controller is unreachable: if it comes back, it gets only what is left.

The output of a ``Checked`` step is ``awaiting`` (``decide``'s ``confirm_pending``): the
phase is DOWN, a reachable controller has not answered yet, and ``since +
confirm_timeout`` is still ahead; then ``wake_at`` is that deadline, when a pass must
run to let the withdrawal go. The daemon keeps one timer for the earliest ``wake_at`` of
all VIPs. A ``HoldReplaced`` step decides nothing: the pass that follows the new plan does.

An illegal event (a negative timeout, an unknown event type) raises; the caller's state
is a frozen value and stays as it was.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Final


class Phase(enum.Enum):
    CLEAR = "clear"  # the active origin is not known to be down (healthy, or no verdict yet)
    DOWN = "down"  # down, and no safety hold: the controller has until since + timeout
    HELD = "held"  # down, and the plan holds it announced (safety_hold): that was the answer


class Input(enum.Enum):
    """What an event is, for the transition table."""

    NOT_DOWN = "not_down"
    DOWN = "down"
    DOWN_HELD = "down_held"
    HOLD_REPLACED = "hold_replaced"


# (phase, input) -> next phase. Entering a phase sets `since` to now; staying keeps it.
TRANSITIONS: Final[dict[tuple[Phase, Input], Phase]] = {
    (Phase.CLEAR, Input.NOT_DOWN): Phase.CLEAR,
    (Phase.CLEAR, Input.DOWN): Phase.DOWN,
    (Phase.CLEAR, Input.DOWN_HELD): Phase.HELD,
    (Phase.CLEAR, Input.HOLD_REPLACED): Phase.CLEAR,  # nothing was waiting
    (Phase.DOWN, Input.NOT_DOWN): Phase.CLEAR,
    (Phase.DOWN, Input.DOWN): Phase.DOWN,
    (Phase.DOWN, Input.DOWN_HELD): Phase.HELD,
    # A hold came and went between two passes: it was an answer all the same.
    (Phase.DOWN, Input.HOLD_REPLACED): Phase.HELD,
    (Phase.HELD, Input.NOT_DOWN): Phase.CLEAR,
    (Phase.HELD, Input.DOWN): Phase.DOWN,  # the hold lifted: a new wait starts now
    (Phase.HELD, Input.DOWN_HELD): Phase.HELD,
    (Phase.HELD, Input.HOLD_REPLACED): Phase.HELD,
}


@dataclass(frozen=True)
class ConfirmState:
    """Where one VIP's wait stands: its phase and since when."""

    phase: Phase
    since: float


@dataclass(frozen=True)
class Checked:
    """What one reconcile pass sees of a VIP."""

    down: bool  # the active origin's verdict is False
    safety_hold: bool = False  # the plan keeps it announced although it is down
    confirmed: bool = False  # the plan says backend_down for this POP: the controller said go
    reachable: bool = False  # a controller is configured and answered lately
    timeout: float = 0.0  # confirm_timeout; 0 turns the wait off


@dataclass(frozen=True)
class HoldReplaced:
    """The plan that held this VIP (safety_hold) was replaced by a new plan."""


Event = Checked | HoldReplaced


def initial(now: float) -> ConfirmState:
    """A VIP nobody has seen down."""
    return ConfirmState(Phase.CLEAR, now)


def _input(event: Event) -> Input:
    if isinstance(event, HoldReplaced):
        return Input.HOLD_REPLACED
    if isinstance(event, Checked):
        if event.timeout < 0:
            raise ValueError(f"confirm_timeout must be >= 0, got {event.timeout}")
        if not event.down:
            return Input.NOT_DOWN
        return Input.DOWN_HELD if event.safety_hold else Input.DOWN
    raise TypeError(f"not a confirm event: {event!r}")


def step(state: ConfirmState, event: Event, now: float) -> tuple[ConfirmState, bool, float | None]:
    """Feed one event; return (new state, awaiting the controller?, wake_at or None)."""
    to = TRANSITIONS[(state.phase, _input(event))]
    new = state if to is state.phase else ConfirmState(to, now)
    if not isinstance(event, Checked) or to is not Phase.DOWN:
        return new, False, None
    deadline = new.since + event.timeout
    if event.reachable and not event.confirmed and event.timeout > 0 and now < deadline:
        return new, True, deadline
    return new, False, None
