"""The controller's metrics read one snapshot through ``ControllerView``: no server needed."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from controller.metrics.central import (ALARM_KINDS, ActiveOrigin, ControllerMetrics, ControllerSnapshot,
                                        PopSnapshot)


class FakeView:
    def __init__(self, snapshot: ControllerSnapshot) -> None:
        self.snapshot = snapshot

    def metrics_snapshot(self) -> ControllerSnapshot:
        return self.snapshot


def test_the_collector_exports_the_snapshot_with_every_alarm_label_set() -> None:
    view = FakeView(ControllerSnapshot(
        pops=(PopSnapshot("sjc", 7, 2, 1, 3.5, False), PopSnapshot("fra", 2, 0, 0, float("inf"), True)),
        vips=("game-global", "api-eu"), alarms=frozenset({("min_pops_hold", "api-eu")}),
        active_origins=(ActiveOrigin("game-global", "eu-central", False),), config_ok=False,
        config_loaded_at=1000.0))
    registry = CollectorRegistry()
    ControllerMetrics(registry, lambda: view)
    get = registry.get_sample_value
    assert get("anycast_controller_plan_generation", {"pop": "sjc"}) == 7.0
    assert get("anycast_controller_vips_planned", {"pop": "sjc"}) == 2.0
    assert get("anycast_controller_safety_holds", {"pop": "sjc"}) == 1.0
    assert get("anycast_controller_report_age_seconds", {"pop": "fra"}) == float("inf")
    assert get("anycast_controller_pop_drained", {"pop": "fra"}) == 1.0
    assert get("anycast_controller_pop_drained", {"pop": "sjc"}) == 0.0
    for vip in ("game-global", "api-eu"):
        for kind in ALARM_KINDS:
            expected = 1.0 if (kind, vip) == ("min_pops_hold", "api-eu") else 0.0
            assert get("anycast_controller_alarm", {"kind": kind, "vip": vip}) == expected
    assert get("anycast_controller_active_origin",
               {"vip": "game-global", "origin": "eu-central", "primary": "false"}) == 1.0
    assert get("anycast_controller_config_last_reload_successful") == 0.0
    assert get("anycast_controller_config_loaded_timestamp_seconds") == 1000.0


def test_the_alarm_label_sets_are_the_planners_alarm_kinds() -> None:
    """Metrics import nothing of the planner (the layering contract), so the zeroed label
    sets are listed there: this keeps the two lists one."""
    from controller.policy.model import AlarmKind
    assert ALARM_KINDS == tuple(AlarmKind)
