"""The confirm-pending state machine, replayed from tables of passes with a fake clock.

Notation: a history is a string of events, one per second from t=1, with
confirm_timeout = 2.5 s (so a wait that starts at t covers the passes at t, t+1, t+2):

  "." a pass: the active origin is not down (healthy, or no verdict yet)
  "d" a pass: down, the controller reachable, no answer yet
  "h" a pass: down, and the plan holds it (safety_hold)
  "g" a pass: down, and the plan says backend_down here (the controller's "go")
  "u" a pass: down, the controller unreachable
  "0" a pass: down, the controller reachable, confirm_timeout 0 (no waiting)
  "r" the plan that held the VIP was replaced (not a pass)

Expected phases are letters C(lear) D(own) H(eld); expected outputs "w" (awaiting the
controller) or "-" (not).
"""

from __future__ import annotations

import pytest

from controller.agent import confirm
from controller.agent.confirm import Checked, ConfirmState, HoldReplaced, Input, Phase

TIMEOUT = 2.5
EVENTS: dict[str, confirm.Event] = {
    ".": Checked(down=False, reachable=True, timeout=TIMEOUT),
    "d": Checked(down=True, reachable=True, timeout=TIMEOUT),
    "h": Checked(down=True, safety_hold=True, reachable=True, timeout=TIMEOUT),
    "g": Checked(down=True, confirmed=True, reachable=True, timeout=TIMEOUT),
    "u": Checked(down=True, reachable=False, timeout=TIMEOUT),
    "0": Checked(down=True, reachable=True, timeout=0.0),
    "r": HoldReplaced(),
}
LETTER = {Phase.CLEAR: "C", Phase.DOWN: "D", Phase.HELD: "H"}


def replay(history: str) -> list[tuple[ConfirmState, bool, float | None]]:
    state = confirm.initial(0.0)
    out = []
    for t, ch in enumerate(history, start=1):
        state, awaiting, wake_at = confirm.step(state, EVENTS[ch], float(t))
        out.append((state, awaiting, wake_at))
    return out


@pytest.mark.parametrize(
    "history, phases, outputs, wake_ats",
    [
        # Healthy: nothing to wait for.
        ("...", "CCC", "---", [None, None, None]),
        # Down with a reachable controller: hold until since + timeout (1 + 2.5 = 3.5),
        # each pass waking at the same deadline (a later pass does not extend the wait).
        ("ddddd", "DDDDD", "www--", [3.5, 3.5, 3.5, None, None]),
        # Recovered: the wait is over; a new failure starts a new wait.
        ("dd.dd", "DDCDD", "ww-ww", [3.5, 3.5, None, 6.5, 6.5]),
        # The controller says go: no waiting, at once.
        ("g", "D", "-", [None]),
        ("dg", "DD", "w-", [3.5, None]),
        # A go that is taken back (the plan changes its mind): what is left of the wait.
        ("dgd", "DDD", "w-w", [3.5, None, 3.5]),
        # The controller holds it: no waiting while held (the plan keeps it announced).
        ("dhhh", "DHHH", "w---", [3.5, None, None, None]),
        # The hold lifts while still down: the hold was an answer, a new wait starts.
        ("dhhdddd", "DHHDDDD", "w--www-", [3.5, None, None, 6.5, 6.5, 6.5, None]),
        # Held from the first pass that saw it down, then lifted: the wait starts then.
        ("hdd", "HDD", "-ww", [None, 4.5, 4.5]),
        # A hold plan that came and went between two passes still counts as the answer.
        ("drddd", "DHDDD", "w-www", [3.5, None, 5.5, 5.5, 5.5]),
        ("hrd", "HHD", "--w", [None, None, 5.5]),
        # Replacing a plan while the origin is fine changes nothing.
        (".r.", "CCC", "---", [None, None, None]),
        # Unreachable controller: no waiting (static stability) ...
        ("uuu", "DDD", "---", [None, None, None]),
        # ... but the wait is counted from the failure: back in time, it gets what is left.
        ("uddd", "DDDD", "-ww-", [None, 3.5, 3.5, None]),
        ("uuudd", "DDDDD", "-----", [None] * 5),
        # confirm_timeout 0 turns the wait off.
        ("00", "DD", "--", [None, None]),
        # Recovering while held forgets everything.
        ("dh.d", "DHCD", "w--w", [3.5, None, None, 6.5]),
    ],
)
def test_replay(history: str, phases: str, outputs: str, wake_ats: list[float | None]) -> None:
    got = replay(history)
    assert "".join(LETTER[s.phase] for s, _, _ in got) == phases
    assert "".join("w" if awaiting else "-" for _, awaiting, _ in got) == outputs
    assert [w for _, _, w in got] == wake_ats


def test_since_is_kept_while_the_phase_stays_and_set_when_it_changes() -> None:
    states = [s for s, _, _ in replay("ddhh.d")]
    assert [s.since for s in states] == [1.0, 1.0, 3.0, 3.0, 5.0, 6.0]


def test_every_phase_handles_every_input() -> None:
    assert set(confirm.TRANSITIONS) == {(p, i) for p in Phase for i in Input}


def test_a_wake_at_is_exactly_the_deadline_and_the_last_moment_is_not_awaited() -> None:
    down = Checked(down=True, reachable=True, timeout=2.0)
    state, awaiting, wake_at = confirm.step(confirm.initial(0.0), down, 10.0)
    assert (awaiting, wake_at) == (True, 12.0)
    assert confirm.step(state, down, 11.999)[1:] == (True, 12.0)
    assert confirm.step(state, down, 12.0)[1:] == (False, None)  # the deadline itself: go


@pytest.mark.parametrize("event, error", [
    (Checked(down=True, reachable=True, timeout=-1.0), ValueError),
    ("down", TypeError),
])
def test_an_illegal_event_raises_and_changes_nothing(event: object, error: type[Exception]) -> None:
    state, _, _ = confirm.step(confirm.initial(0.0), EVENTS["d"], 1.0)
    before = state
    with pytest.raises(error):
        confirm.step(state, event, 2.0)  # type: ignore[arg-type]
    assert state == before == ConfirmState(Phase.DOWN, 1.0)
