"""The watchdog's proof that ExaBGP answers: pings only within an interval of the last ack."""

from __future__ import annotations

from controller.agent.liveness import PROBE, ExaBGPLiveness


def test_no_ack_yet_is_not_alive() -> None:
    assert not ExaBGPLiveness(5.0).alive(100.0)


def test_alive_until_one_interval_after_the_last_ack() -> None:
    live = ExaBGPLiveness(5.0)
    live.acked(100.0)
    assert live.alive(100.0) and live.alive(105.0)
    assert not live.alive(105.01)
    live.acked(106.0)  # ExaBGP answers again: pings resume
    assert live.alive(110.0)


def test_a_clock_going_back_is_not_proof() -> None:
    live = ExaBGPLiveness(5.0)
    live.acked(100.0)
    assert not live.alive(99.0)


def test_probes_twice_per_interval_with_a_harmless_command() -> None:
    assert ExaBGPLiveness(5.0).probe_every() == 2.5
    assert PROBE == "enable-ack"
