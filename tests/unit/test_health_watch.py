"""The watch connection's state machine, replayed from tables: pure, no sockets, no clock.

A history is a list of (seconds since the start, event); the table gives, after each
event, the phase, the attempts counter, the effects (C: Connect, !: Confirm) and the wake-up
delay (seconds after the event, None for no timer).
"""

from __future__ import annotations

import pytest

from controller.health import watch as w
from controller.health.watch import (
    BACKOFF_BASE, BACKOFF_MAX, STABLE_AFTER, Confirm, Connect, ConnectFailed, Connected, LossKind, Lost,
    ProbeSucceeded, Timer, WatchPhase, WatchState,
)

T0 = 100.0
OK = Connected()
FAIL = ConnectFailed("connect refused")
RST = Lost(LossKind.RESET, "connection reset")
FIN = Lost(LossKind.EOF, "closed by the backend (FIN)")
TICK = Timer()
UP = ProbeSucceeded()
P = {"c": WatchPhase.CONNECTING, "u": WatchPhase.CONNECTED, "b": WatchPhase.BACKOFF}


def effects_text(effects: tuple[w.WatchEffect, ...]) -> str:
    return "".join("C" if isinstance(e, Connect) else "!" for e in effects)


def replay(history: list[tuple[float, w.WatchEvent]]) -> list[tuple[str, int, str, float | None]]:
    state, effects = w.initial(T0)
    assert effects_text(effects) == "C"
    out = []
    for at, event in history:
        state, effects, wake_at = w.step(state, event, T0 + at)
        out.append((state.phase.value[0] if state.phase is not WatchPhase.CONNECTED else "u", state.attempts,
                    effects_text(effects), None if wake_at is None else round(wake_at - (T0 + at), 6)))
    return out


@pytest.mark.parametrize("history, expected", [
    # Connected, then reset after a long life: confirm, reconnect at once, backoff reset.
    ([(0.0, OK), (60.0, RST)], [("u", 0, "", None), ("c", 0, "!C", None)]),
    # FIN is a loss like RST.
    ([(0.0, OK), (60.0, FIN), (60.001, OK)], [("u", 0, "", None), ("c", 0, "!C", None), ("u", 0, "", None)]),
    # Lost soon after connecting (a server that closes idle connections at once): confirm,
    # then back off, doubling.
    ([(0.0, OK), (0.01, FIN), (0.2, TICK), (0.2, OK), (0.21, FIN)],
     [("u", 0, "", None), ("b", 1, "!", BACKOFF_BASE), ("c", 1, "C", None), ("u", 1, "", None),
      ("b", 2, "!", 2 * BACKOFF_BASE)]),
    # Refused connects back off: 0.1, 0.2, 0.4 ... and no confirmation (a connect failure
    # is no evidence of a loss; the probes judge the backend).
    ([(0.0, FAIL), (0.1, TICK), (0.1, FAIL), (0.3, TICK), (0.3, FAIL)],
     [("b", 1, "", BACKOFF_BASE), ("c", 1, "C", None), ("b", 2, "", 2 * BACKOFF_BASE), ("c", 2, "C", None),
      ("b", 3, "", 4 * BACKOFF_BASE)]),
    # A backend back from a crash: the first successful probe ends a backoff of refused
    # connects at once (the count stays until a connection lasts).
    ([(0.0, OK), (60.0, RST), (60.0, FAIL), (60.1, TICK), (60.1, FAIL), (60.2, UP), (60.2, OK)],
     [("u", 0, "", None), ("c", 0, "!C", None), ("b", 1, "", BACKOFF_BASE), ("c", 1, "C", None),
      ("b", 2, "", 2 * BACKOFF_BASE), ("c", 2, "C", None), ("u", 2, "", None)]),
    # ... but not a backoff after an early close (the server closes idle connections): no
    # loop of connect, close, confirm, success, connect.
    ([(0.0, OK), (0.01, FIN), (0.02, UP)], [("u", 0, "", None), ("b", 1, "!", BACKOFF_BASE),
                                            ("b", 1, "", None)]),
    # Connected or connecting, a success changes nothing.
    ([(0.0, UP), (0.0, OK), (1.0, UP)], [("c", 0, "", None), ("u", 0, "", None), ("u", 0, "", None)]),
    # A connection that lasts STABLE_AFTER resets the count at its loss.
    ([(0.0, FAIL), (0.1, TICK), (0.1, OK), (0.1 + STABLE_AFTER, RST)],
     [("b", 1, "", BACKOFF_BASE), ("c", 1, "C", None), ("u", 1, "", None), ("c", 0, "!C", None)]),
])
def test_watch_histories(history: list[tuple[float, w.WatchEvent]],
                         expected: list[tuple[str, int, str, float | None]]) -> None:
    assert replay(history) == expected


def test_backoff_doubles_up_to_its_cap() -> None:
    waits = [w.backoff(n) for n in range(1, 40)]
    assert waits[:3] == [BACKOFF_BASE, 2 * BACKOFF_BASE, 4 * BACKOFF_BASE]
    assert all(a <= b for a, b in zip(waits, waits[1:]))
    assert max(waits) == BACKOFF_MAX == waits[-1]


def test_a_confirm_says_how_and_after_how_long_the_connection_was_lost() -> None:
    state = WatchState(WatchPhase.CONNECTED, T0)
    _, effects, _ = w.step(state, RST, T0 + 5.0)
    assert effects[0] == Confirm(LossKind.RESET, "connection reset", 5.0)


@pytest.mark.parametrize("phase, event", [
    (WatchPhase.CONNECTING, RST), (WatchPhase.CONNECTING, TICK),
    (WatchPhase.CONNECTED, OK), (WatchPhase.CONNECTED, FAIL), (WatchPhase.CONNECTED, TICK),
    (WatchPhase.BACKOFF, OK), (WatchPhase.BACKOFF, FAIL), (WatchPhase.BACKOFF, RST),
])
def test_an_impossible_event_raises_and_changes_nothing(phase: WatchPhase, event: w.WatchEvent) -> None:
    state = WatchState(phase, T0, attempts=2)
    with pytest.raises(ValueError, match=f"{type(event).__name__} cannot happen while {phase.value}"):
        w.step(state, event, T0 + 1)
    assert state == WatchState(phase, T0, attempts=2)
