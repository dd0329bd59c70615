"""The health state machine, replayed from tables of probe results.

Notation: a history is a string of results, "+" a successful check and "-" a failed one;
the expected phases after each result are letters: I(nit) R(ising) U(p) F(alling) D(own).
"""

from __future__ import annotations

import pytest

from controller.health import state as hs
from controller.health.state import HealthState, Phase, Transition

LETTER = {"I": Phase.INIT, "R": Phase.RISING, "U": Phase.UP, "F": Phase.FALLING, "D": Phase.DOWN}


def replay(
    history: str, rise: int, fall: int, start: float = 100.0
) -> list[tuple[HealthState, Transition | None]]:
    """Feed the results one per second from `start`; each probe's detail names its index."""
    state = hs.initial(start)
    out = []
    for i, r in enumerate(history, start=1):
        state, transition = hs.step(state, r == "+", rise, fall, start + i, detail=f"probe {i}")
        out.append((state, transition))
    return out


@pytest.mark.parametrize(
    "rise, fall, history, phases",
    [
        # INIT: rise successes in a row -> UP, fall failures in a row -> DOWN.
        (3, 2, "+++", "IIU"),
        (3, 2, "--", "ID"),
        # INIT: a result of the other kind restarts the count.
        (3, 2, "++-+++", "IIIIIU"),
        (3, 2, "-+-+-+--", "IIIIIIID"),
        (3, 3, "++--+++", "IIIIIIU"),
        # UP: successes keep it UP; a failure starts FALLING; one success ends the doubt.
        (2, 3, "++++", "IUUU"),
        (2, 3, "++-+", "IUFU"),
        (2, 3, "++--+", "IUFFU"),
        # FALLING counts failures in a row until `fall`.
        (2, 3, "++---", "IUFFD"),
        (2, 3, "++--+---", "IUFFUFFD"),
        # DOWN: failures keep it DOWN; a success starts RISING; one failure ends it.
        (2, 2, "----", "IDDD"),
        (3, 2, "--+-", "IDRD"),
        (3, 2, "--++-", "IDRRD"),
        # RISING counts successes in a row until `rise`.
        (3, 2, "--+++", "IDRRU"),
        (3, 2, "--++-+++", "IDRRDRRU"),
        # A full cycle and back.
        (2, 2, "++--++", "IUFDRU"),
        # rise == 1: INIT and DOWN go straight to UP on one success; there is no RISING.
        (1, 3, "+", "U"),
        (1, 3, "---+", "IIDU"),
        (1, 3, "---+-+", "IIDUFU"),
        # fall == 1: INIT and UP go straight to DOWN on one failure; there is no FALLING.
        (3, 1, "-", "D"),
        (3, 1, "+++-", "IIUD"),
        (3, 1, "+++-+-", "IIUDRD"),
        # Both 1: every result is a verdict.
        (1, 1, "+-+-", "UDUD"),
        (1, 1, "--++", "DDUU"),
    ],
)
def test_phase_after_each_result(rise: int, fall: int, history: str, phases: str) -> None:
    got = "".join(next(k for k, v in LETTER.items() if v is s.phase) for s, _ in replay(history, rise, fall))
    assert got == phases


@pytest.mark.parametrize(
    "rise, fall, history, transitions",
    [
        (2, 2, "++", [("init", "up", "rise_reached")]),
        (2, 2, "--", [("init", "down", "fall_reached")]),
        (
            2, 2, "++--++",
            [
                ("init", "up", "rise_reached"),
                ("up", "falling", "check_failed"),
                ("falling", "down", "fall_reached"),
                ("down", "rising", "check_recovered"),
                ("rising", "up", "rise_reached"),
            ],
        ),
        (2, 2, "++-+", [("init", "up", "rise_reached"), ("up", "falling", "check_failed"),
                        ("falling", "up", "check_recovered")]),
        (2, 2, "--+-", [("init", "down", "fall_reached"), ("down", "rising", "check_recovered"),
                        ("rising", "down", "check_failed")]),
        # Straight jumps when one result is enough.
        (1, 1, "+-+", [("init", "up", "rise_reached"), ("up", "down", "fall_reached"),
                       ("down", "up", "rise_reached")]),
        # With rise 1, a success ends FALLING as a recovery, not as a new rise.
        (1, 2, "+-+", [("init", "up", "rise_reached"), ("up", "falling", "check_failed"),
                       ("falling", "up", "check_recovered")]),
        # With fall 1, a failure ends RISING the same way.
        (2, 1, "-+-", [("init", "down", "fall_reached"), ("down", "rising", "check_recovered"),
                       ("rising", "down", "check_failed")]),
    ],
)
def test_transitions_carry_a_reason(
    rise: int, fall: int, history: str, transitions: list[tuple[str, str, str]]
) -> None:
    got = [(t.from_phase.value, t.to_phase.value, t.reason) for _, t in replay(history, rise, fall) if t]
    assert got == transitions


def test_a_transition_only_when_the_phase_changes() -> None:
    steps = replay("+++++--", rise=3, fall=3)
    changed = [i for i, (_, t) in enumerate(steps, start=1) if t is not None]
    assert changed == [3, 6]  # INIT -> UP at the 3rd result, UP -> FALLING at the 6th


def test_transition_records_time_and_the_probe_detail() -> None:
    steps = replay("++", rise=2, fall=2, start=1000.0)
    state, transition = steps[-1]
    assert transition == Transition(Phase.INIT, Phase.UP, 1002.0, "rise_reached", "probe 2")
    assert state.since == 1002.0


def test_since_is_when_the_phase_was_entered_not_the_last_check() -> None:
    steps = replay("+++++-", rise=2, fall=3, start=0.0)
    assert [s.since for s, _ in steps] == [0.0, 2.0, 2.0, 2.0, 2.0, 6.0]


def test_initial_state_has_no_verdict_and_its_own_time() -> None:
    s = hs.initial(42.5)
    assert (s.phase, s.since, s.healthy) == (Phase.INIT, 42.5, None)


@pytest.mark.parametrize(
    "phase, healthy",
    [
        (Phase.INIT, None),
        (Phase.RISING, False),
        (Phase.UP, True),
        (Phase.FALLING, True),  # still serving until `fall` failures confirm
        (Phase.DOWN, False),
    ],
)
def test_healthy_verdict_per_phase(phase: Phase, healthy: bool | None) -> None:
    assert HealthState(phase, 0.0).healthy is healthy


def test_healthy_verdict_along_a_flap() -> None:
    verdicts = [s.healthy for s, _ in replay("++--+-++", rise=2, fall=2)]
    assert verdicts == [None, True, True, False, False, False, False, True]


def test_phase_values_are_the_strings_in_metrics_and_logs() -> None:
    assert [p.value for p in Phase] == ["init", "rising", "up", "falling", "down"]


def test_a_smaller_rise_after_a_reload_takes_effect_at_the_next_success() -> None:
    state = hs.initial(0.0)
    for t in (1.0, 2.0, 3.0, 4.0):
        state, _ = hs.step(state, False, 5, 2, t)
    for t in (5.0, 6.0):
        state, _ = hs.step(state, True, 5, 2, t)
    assert state.phase is Phase.RISING
    state, transition = hs.step(state, True, 2, 2, 7.0)  # rise lowered from 5 to 2
    assert state.phase is Phase.UP and transition is not None and transition.reason == "rise_reached"


@pytest.mark.parametrize("rise, fall", [(0, 2), (2, 0), (-1, 1), (0, 0)])
def test_invalid_rise_or_fall_is_rejected_and_changes_nothing(rise: int, fall: int) -> None:
    before = replay("++", rise=2, fall=2)[-1][0]
    snapshot = HealthState(before.phase, before.since, before.successes, before.failures)
    with pytest.raises(ValueError, match="rise and fall"):
        hs.step(before, False, rise, fall, 99.0)
    assert before == snapshot


def test_states_are_immutable_values() -> None:
    s = hs.initial(0.0)
    with pytest.raises(AttributeError):
        s.phase = Phase.UP  # type: ignore[misc]
    s2, _ = hs.step(s, True, 3, 3, 1.0)
    assert s == hs.initial(0.0) and s2 != s
