"""Level-based reconcile of BGP announcements: desired (decisions) vs. what ExaBGP holds.

Pure. Each pass takes the whole set of decisions and the agent's record of what it has
announced, and returns the commands that close the gap. Sending the same set twice
yields no commands.

``unsure`` holds prefixes whose state in ExaBGP the agent does not know: after a restart,
ExaBGP may still announce what a previous agent process announced (it keeps routes when
its API process dies), or may have nothing (if ExaBGP itself restarted). For those, the
first decided action is always sent; announce and withdraw are idempotent in ExaBGP, and
an identical re-announce is not a flap. A HOLD decision sends nothing, so a kept route
stays until the checks have a verdict.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..config.model import Attributes, IPNetwork
from .decide import Action, Decision, DecisionReason, Reason


@dataclass(frozen=True)
class Announce:
    prefix: IPNetwork
    attributes: Attributes
    vip: str
    reason: DecisionReason


@dataclass(frozen=True)
class Withdraw:
    prefix: IPNetwork
    vip: str
    reason: DecisionReason
    detail: str = ""


Command = Announce | Withdraw


def reconcile(
    decisions: Iterable[Decision],
    announced: Mapping[IPNetwork, Attributes],
    unsure: Iterable[IPNetwork] = (),
    withdraw_undecided: bool = True,
    undecided_reason: Reason = Reason.NOT_IN_CONFIG,
) -> list[Command]:
    """Commands that take ExaBGP from ``announced`` to what ``decisions`` want.

    A prefix announced (or unsure) with no decision at all, e.g. a VIP removed from the
    config, is withdrawn with reason ``not_in_config`` -- unless ``withdraw_undecided`` is
    False (no plan known yet: absence from it means nothing).
    """
    unsure_set = set(unsure)
    commands: list[Command] = []
    decided: set[IPNetwork] = set()
    for d in decisions:
        decided.add(d.prefix)
        if d.action is Action.ANNOUNCE:
            assert d.attributes is not None
            if d.prefix in unsure_set or announced.get(d.prefix) != d.attributes:
                commands.append(Announce(d.prefix, d.attributes, d.vip, d.reason))
        elif d.action is Action.WITHDRAW:
            if d.prefix in announced or d.prefix in unsure_set:
                commands.append(Withdraw(d.prefix, d.vip, d.reason, d.detail))
    if not withdraw_undecided:
        return commands
    # Only the undecided are sorted: at a cold start every VIP is unsure and decided.
    for prefix in sorted((set(announced) | unsure_set) - decided, key=_sort_key):
        commands.append(Withdraw(prefix, str(prefix.network_address), undecided_reason,
                                 "no longer in the config" if undecided_reason == Reason.NOT_IN_CONFIG
                                 else "no longer in the controller's plan for this POP"))
    return commands


def apply(announced: Mapping[IPNetwork, Attributes], command: Command) -> dict[IPNetwork, Attributes]:
    """The announced map after ExaBGP acknowledged ``command``."""
    after = dict(announced)
    if isinstance(command, Announce):
        after[command.prefix] = command.attributes
    else:
        after.pop(command.prefix, None)
    return after


def _sort_key(prefix: IPNetwork) -> tuple[int, int]:
    return prefix.version, int(prefix.network_address)
