"""Flap dampening for one VIP at one POP, with exponential backoff. Pure.

A POP whose verdict on the active origin changes ``flaps`` times within ``window`` seconds
is held down (withdrawn) for ``hold_down * 2**penalty`` seconds, capped at
``max_hold_down``; each hold-down raises the penalty. After ``max_hold_down`` seconds
without a flap or hold-down the penalty is forgotten.
"""

from __future__ import annotations

from ..config.desired_model import DampeningPolicy
from .model import PopVipMemory


def observe(memory: PopVipMemory, verdict: bool | None, policy: DampeningPolicy, now: float) -> PopVipMemory:
    """Record the POP's current verdict; start a hold-down if it flaps too often."""
    flaps = tuple(t for t in memory.flaps if now - t <= policy.window)
    quiet_since = memory.quiet_since
    changed = verdict is not None and memory.verdict is not None and verdict != memory.verdict
    if changed:
        flaps += (now,)
        quiet_since = now
    penalty = memory.penalty
    if penalty and now >= memory.dampened_until and now - max(quiet_since, memory.dampened_until) >= policy.max_hold_down:
        penalty = 0  # quiet long enough: forgive
    dampened_until = memory.dampened_until
    if len(flaps) >= policy.flaps and now >= dampened_until:
        dampened_until = now + min(policy.hold_down * 2 ** penalty, policy.max_hold_down)
        penalty += 1
        flaps = ()
        quiet_since = now
    return PopVipMemory(
        verdict=verdict if verdict is not None else memory.verdict, flaps=flaps,
        dampened_until=dampened_until, penalty=penalty, quiet_since=quiet_since, withdrawn=memory.withdrawn,
        down_since=memory.down_since,
    )


def dampened(memory: PopVipMemory, now: float) -> bool:
    return now < memory.dampened_until
