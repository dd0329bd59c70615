"""The decision (announce/withdraw/hold, always with a reason) and the level-based diff."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

import pytest

from controller.agent.decide import Action, Decision, Reason, decide, origin_health
from controller.agent.intent import VipIntent, plan_from_config
from controller.agent.reconcile import Announce, Withdraw, apply, reconcile
from controller.config.agent import load_agent_config
from controller.config.model import Attributes

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "agent-sjc.yaml"
CONFIG = load_agent_config(str(EXAMPLE))
VIP = CONFIG.vips[0]
USW, EUC = VIP.origins
P = VIP.prefix
UP_ATTRS = VIP.attributes.up


def health(usw: tuple[bool | None, ...], euc: tuple[bool | None, ...] = (None,)) -> dict:
    h = {(VIP.name, USW.region, b): v for b, v in zip(USW.backends, usw)}
    h.update({(VIP.name, EUC.region, b): v for b, v in zip(EUC.backends, euc)})
    return h


def intent(**kw: object) -> VipIntent:
    return dataclasses.replace(VipIntent(VIP.name, True, "us-west"), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "usw, the_intent, action, reason",
    [
        ((True, True), intent(), Action.ANNOUNCE, Reason.HEALTHY),
        ((True, False), intent(), Action.ANNOUNCE, Reason.HEALTHY),  # one of two is enough (min_healthy 1)
        ((False, False), intent(), Action.WITHDRAW, Reason.BACKEND_DOWN),
        ((False, None), intent(), Action.HOLD, Reason.HEALTH_UNKNOWN),  # the other may still come up
        ((None, None), intent(), Action.HOLD, Reason.HEALTH_UNKNOWN),
        ((True, True), intent(drain=True), Action.ANNOUNCE, Reason.DRAINING),
        ((False, False), intent(drain=True), Action.WITHDRAW, Reason.BACKEND_DOWN),
        ((True, True), intent(wanted=False, reason="admin_down"), Action.WITHDRAW, "admin_down"),
        ((True, True), intent(wanted=False), Action.WITHDRAW, Reason.NOT_IN_PLAN),
        ((True, True), None, Action.WITHDRAW, Reason.NOT_IN_PLAN),
        ((True, True), intent(active_origin="mars"), Action.WITHDRAW, Reason.UNKNOWN_ORIGIN),
        # The controller's safety hold keeps a locally-down VIP announced (checks broken everywhere).
        ((False, False), intent(safety_hold=True), Action.ANNOUNCE, Reason.SAFETY_HOLD),
        ((True, True), intent(safety_hold=True), Action.ANNOUNCE, Reason.HEALTHY),
        ((True, True), intent(wanted=False, safety_hold=True), Action.WITHDRAW, Reason.NOT_IN_PLAN),
    ],
)
def test_decide_table(usw: tuple, the_intent: VipIntent | None, action: Action, reason: str) -> None:
    d = decide(VIP, the_intent, health(usw), CONFIG.allowed_prefixes)
    assert (d.action, d.reason) == (action, reason)


def test_announce_carries_state_attributes_and_the_active_origin_next_hop() -> None:
    up = decide(VIP, intent(), health((True, True)), CONFIG.allowed_prefixes)
    assert (up.attributes, up.origin, up.next_hop) == (UP_ATTRS, "us-west", USW.next_hop)
    drain = decide(VIP, intent(drain=True), health((True, True)), CONFIG.allowed_prefixes)
    assert drain.attributes == VIP.attributes.draining and drain.status == "draining"


def test_active_origin_from_the_plan_decides_which_health_counts() -> None:
    # us-west is down but the plan moved the VIP to eu-central, which is healthy.
    d = decide(VIP, intent(active_origin="eu-central"), health((False, False), (True,)), CONFIG.allowed_prefixes)
    assert (d.action, d.origin, d.next_hop) == (Action.ANNOUNCE, "eu-central", EUC.next_hop)


def test_vip_outside_allowed_prefixes_is_never_announced_even_if_healthy() -> None:
    d = decide(VIP, intent(), health((True, True)), [ipaddress.ip_network("203.0.113.0/24")])
    assert (d.action, d.reason) == (Action.WITHDRAW, Reason.NOT_ALLOWED)


def test_backend_down_detail_explains_the_count() -> None:
    d = decide(VIP, intent(), health((False, False)), CONFIG.allowed_prefixes)
    assert d.detail == "0/2 backends healthy in us-west (need 1)"


def test_origin_min_healthy() -> None:
    two = dataclasses.replace(USW, min_healthy=2)
    assert origin_health(two, [True, False])[0] is False
    assert origin_health(two, [True, None])[0] is None
    assert origin_health(two, [True, True])[0] is True


def test_local_plan_follows_admin_state() -> None:
    for admin, wanted, drain in (("up", True, False), ("drain", True, True), ("down", False, False)):
        cfg = dataclasses.replace(CONFIG, vips=(dataclasses.replace(VIP, admin=admin),))
        i = plan_from_config(cfg).vips[VIP.name]
        assert (i.wanted, i.drain, i.active_origin) == (wanted, drain, "us-west")


# --- reconcile -----------------------------------------------------------------------------
def dec(action: Action, reason: str = "x", attrs: Attributes | None = UP_ATTRS, prefix=P) -> Decision:
    return Decision(VIP.name, prefix, action, reason, attributes=attrs if action is Action.ANNOUNCE else None)


def test_reconcile_announces_then_is_idempotent() -> None:
    cmds = reconcile([dec(Action.ANNOUNCE, "healthy")], {})
    assert cmds == [Announce(P, UP_ATTRS, VIP.name, "healthy")]
    announced = apply({}, cmds[0])
    assert reconcile([dec(Action.ANNOUNCE, "healthy")], announced) == []


def test_reconcile_reannounces_when_attributes_change() -> None:
    drain_attrs = VIP.attributes.draining
    cmds = reconcile([dec(Action.ANNOUNCE, "draining", drain_attrs)], {P: UP_ATTRS})
    assert cmds == [Announce(P, drain_attrs, VIP.name, "draining")]


def test_reconcile_withdraws_only_what_is_announced() -> None:
    assert reconcile([dec(Action.WITHDRAW, "backend_down")], {}) == []
    cmds = reconcile([dec(Action.WITHDRAW, "backend_down")], {P: UP_ATTRS})
    assert cmds == [Withdraw(P, VIP.name, "backend_down")]


def test_hold_never_withdraws_a_kept_route() -> None:
    """After a restart ExaBGP may still announce the VIP: no verdict yet means no command."""
    assert reconcile([dec(Action.HOLD)], {P: UP_ATTRS}, unsure=[P]) == []


def test_unsure_prefixes_get_their_first_decision_sent() -> None:
    # ExaBGP may or may not hold it: send even an "identical" announce, and a withdraw.
    assert reconcile([dec(Action.ANNOUNCE, "healthy")], {P: UP_ATTRS}, unsure=[P]) == [
        Announce(P, UP_ATTRS, VIP.name, "healthy")]
    assert reconcile([dec(Action.WITHDRAW, "backend_down")], {}, unsure=[P]) == [
        Withdraw(P, VIP.name, "backend_down")]


def test_prefix_no_longer_in_config_is_withdrawn_with_reason() -> None:
    gone = ipaddress.ip_network("198.51.100.99/32")
    cmds = reconcile([dec(Action.ANNOUNCE, "healthy")], {P: UP_ATTRS, gone: UP_ATTRS})
    assert cmds == [Withdraw(gone, "198.51.100.99", Reason.NOT_IN_CONFIG, "no longer in the config")]


def test_withdrawing_one_vip_keeps_the_others() -> None:
    other = ipaddress.ip_network("198.51.100.11/32")
    decisions = [dec(Action.WITHDRAW, "backend_down"), dec(Action.ANNOUNCE, "healthy", prefix=other)]
    cmds = reconcile(decisions, {P: UP_ATTRS, other: UP_ATTRS})
    assert cmds == [Withdraw(P, VIP.name, "backend_down")]


def test_a_reachable_controller_gets_to_confirm_a_withdrawal_first() -> None:
    down = health((False, False))
    d = decide(VIP, intent(), down, CONFIG.allowed_prefixes, confirm_pending=True)
    assert (d.action, d.reason) == (Action.HOLD, Reason.AWAITING_CONTROLLER)
    d = decide(VIP, intent(reason="backend_down"), down, CONFIG.allowed_prefixes, confirm_pending=True)
    assert (d.action, d.reason) == (Action.WITHDRAW, Reason.BACKEND_DOWN)  # confirmed
    d = decide(VIP, intent(safety_hold=True), down, CONFIG.allowed_prefixes, confirm_pending=True)
    assert (d.action, d.reason) == (Action.ANNOUNCE, Reason.SAFETY_HOLD)


def test_within_is_subnet_of_on_any_two_networks() -> None:
    """decide's allowed-prefix test on the integers gives what ipaddress's subnet_of gives, and
    False across families (where subnet_of raises)."""
    from controller.agent.decide import within

    nets = [ipaddress.ip_network(n) for n in (
        "0.0.0.0/0", "198.18.0.0/15", "198.18.0.0/16", "198.19.255.255/32", "198.20.0.0/32", "198.17.255.255/32",
        "10.0.0.0/8", "10.0.0.0/32", "::/0", "2001:db8::/32", "2001:db8::1/128", "2001:db9::/32", "::ffff:0:0/96",
        "::/128")]
    for p in nets:
        for a in nets:
            want = p.version == a.version and p.subnet_of(a)  # type: ignore[arg-type]
            assert within(p, a) is want, (p, a)
