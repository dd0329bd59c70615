"""lab.checks: the lab's judgements on JSON (vtysh subsets, /v1/status, nft rulesets)."""

from __future__ import annotations

from typing import Any

from lab.checks import (agent_problems, client_problems, drop_rules, explain_problems, json_cmp, move_failures,
                        path_subset, prepended, status_problems)
from lab.metrics import parse

# A trimmed `show bgp ipv4 unicast 198.51.100.10/32 json` at t-na (FRR 8.4).
ENTRY: dict[str, Any] = {"prefix": "198.51.100.10/32", "paths": [
    {"aspath": {"string": "64530 65003 65101"}, "community": {"string": "65101:100"},
     "peer": {"peerId": "203.0.113.9"}},
    {"aspath": {"string": "65001 65101"}, "community": {"string": "65101:100"}, "bestpath": {"overall": True},
     "peer": {"peerId": "100.100.0.2"}},
]}
UP = {"as_path_prepend": 0, "communities": ["65101:100"], "med": 100}
DRAINING = {"as_path_prepend": 3, "communities": ["65101:666"], "med": 1000}


def test_json_subset_matches_objects_by_key_and_list_items_in_any_order() -> None:
    assert json_cmp(ENTRY, path_subset("100.100.0.2", [65001, *prepended(65101, UP)], UP["communities"])) == []
    assert json_cmp(ENTRY, {"paths": [{"peer": {"peerId": "100.100.0.2"}}, {"peer": {"peerId": "203.0.113.9"}}]}) == []
    assert json_cmp([1, 2], [2, 1]) == [] and json_cmp([1], [1, 1]) != []  # each item matched once


def test_json_subset_names_what_differs() -> None:
    drained = path_subset("100.100.0.2", [65001, *prepended(65101, DRAINING)], DRAINING["communities"])
    assert json_cmp(ENTRY, drained) == [f".paths[0]: no item matches {drained['paths'][0]!r}"]
    assert json_cmp({"a": {"b": 1}}, {"a": {"b": 2}, "c": 3}) == [".a.b: 1 != 2", ".c: missing"]
    assert json_cmp({}, {"paths": []}) == [".paths: missing"]  # a withdrawn route: no entry at all
    assert json_cmp(None, {"a": 1}) == [".: expected an object, got None"]


def test_prepend_and_med_in_the_subset() -> None:
    assert prepended(65101, DRAINING) == [65101] * 4
    assert path_subset("p", [65101], med=100) == {
        "paths": [{"peer": {"peerId": "p"}, "aspath": {"string": "65101"}, "metric": 100}]}


def status(**pop: Any) -> dict[str, Any]:
    p = {"pop": "sjc", "plan_generation": 4, "report_age": 0.9, "reported_plan_generation": 4,
         "drained_since": None, **pop}
    return {"config": {"revision": "c4fe3fc76626", "last_error": "", "last_error_revision": ""},
            "pops": [p], "alarms": []}


def test_status_of_a_clean_controller() -> None:
    assert status_problems(status(), "c4fe3fc76626", 15) == []
    assert status_problems(None, "c4fe3fc76626", 15) == ["the controller does not answer /v1/status"]
    assert status_problems(status(), "0123456789ab", 15) == ["config revision c4fe3fc76626, not the base 0123456789ab"]


def test_status_leftovers_are_each_named() -> None:
    s = status(drained_since=1000.0, report_age=None, reported_plan_generation=3)
    s["alarms"] = [{"kind": "checks_down_everywhere", "vip": "game-global", "detail": "..."}]
    assert status_problems(s, "c4fe3fc76626", 15) == [
        "sjc drained since 1000.0", "sjc: report age None (stale after 15 s)",
        "sjc reports about plan 3, is served 4", "alarm checks_down_everywhere for game-global"]
    assert status_problems(status(report_age=15.0), "c4fe3fc76626", 15) == ["sjc: report age 15.0 (stale after 15 s)"]


def test_explain_wants_every_pop_healthy_on_the_origin() -> None:
    item = {"pop": "sjc", "wanted": True, "drain": False, "reason": "healthy", "safety_hold": False,
            "active_origin": "us-west", "announced": True, "explanation": "..."}
    assert explain_problems({"pops": [item]}, ["sjc"], "us-west") == []
    assert explain_problems({"pops": [item]}, ["sjc", "sin"], "us-west") == ["sin: not in the VIP's plan"]
    assert explain_problems({"pops": [{**item, "drain": True}]}, ["sjc"], "us-west") == ["sjc: .drain: True != False"]


AGENT = """\
# TYPE anycast_vip_announced gauge
anycast_vip_announced{prefix="198.51.100.10/32",vip="game-global"} 1.0
# TYPE anycast_vip_state gauge
anycast_vip_state{state="up",vip="game-global"} 1.0
anycast_vip_state{state="withdrawn",vip="game-global"} 0.0
# TYPE anycast_bgp_neighbor_up gauge
anycast_bgp_neighbor_up{neighbor="100.64.1.1"} 1.0
# TYPE anycast_controller_reachable gauge
anycast_controller_reachable 1.0
"""


def test_agent_scrape_of_a_clean_pop() -> None:
    assert agent_problems("sjc", parse(AGENT), "game-global", "100.64.1.1") == []
    lost = AGENT.replace("anycast_controller_reachable 1.0", "anycast_controller_reachable 0.0")
    assert agent_problems("sjc", parse(lost), "game-global", "100.64.1.1") == [
        "sjc: anycast_controller_reachable{} = 0.0, expected 1.0"]
    assert len(agent_problems("sjc", parse(""), "game-global", "100.64.1.1")) == 4  # the agent does not answer


def test_drop_rules_found_in_an_nft_ruleset() -> None:
    nat = {"nftables": [{"metainfo": {}}, {"table": {"family": "ip", "name": "lab_nat"}},
                        {"chain": {"family": "ip", "table": "lab_nat", "name": "post", "policy": "accept"}},
                        {"rule": {"family": "ip", "table": "lab_nat", "chain": "post", "handle": 3,
                                  "expr": [{"match": {}}, {"masquerade": None}]}}]}
    assert drop_rules(nat) == []
    cut = {"nftables": [*nat["nftables"],
                        {"chain": {"family": "inet", "table": "labcut", "name": "input", "policy": "drop"}},
                        {"rule": {"family": "inet", "table": "labcut", "chain": "out", "handle": 4,
                                  "expr": [{"match": {}}, {"drop": None}]}}]}
    assert drop_rules(cut) == ["inet labcut input: policy drop", "inet labcut out: rule 4 drops"]


def test_client_requests() -> None:
    ok = {"ok": True, "pop": "sjc", "origin": "us-west"}
    assert client_problems("c-na", [ok, ok], "sjc", "us-west") == []
    assert client_problems("c-na", [], "sjc", "us-west") == ["c-na: no requests lately"]
    assert client_problems("c-na", [ok, {"ok": False, "pop": None}], "sjc", "us-west") == [
        "c-na: 1/2 recent requests not served via sjc by us-west (last: ok=False pop=None origin=None)"]


def test_a_move_explains_at_most_one_reset_request_each_and_none_after_it() -> None:
    ok = {"ok": True}
    reset = {"t": 10.0, "ok": False, "error": "ConnectionResetError"}
    assert move_failures("c-eu", [ok, reset, ok], moves=1, moved_at=10.02) == []
    assert move_failures("c-eu", [ok, ok], moves=0, moved_at=10.02) == []
    assert move_failures("c-eu", [reset], moves=0, moved_at=10.02) != []  # no move: nothing explains it
    blackhole = [{"t": 10.0 + i / 10, "ok": False, "error": "TimeoutError"} for i in range(5)]
    assert move_failures("c-eu", blackhole, moves=1, moved_at=10.5) != []
    late = {"t": 11.0, "ok": False, "error": "TimeoutError"}
    assert move_failures("c-eu", [late], moves=1, moved_at=10.02) != []
