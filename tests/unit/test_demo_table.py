"""The demo's live table fits its columns, and the demo says where to look while the lab runs."""

from __future__ import annotations

from lab.__main__ import ROOT
from lab.demo import Columns, client_cell, fit, where_to_look
from lab.topology import load_topology

TOPO = load_topology()


def cells_for_every_case() -> list[list[str]]:
    pops = [p.name for p in TOPO.pops]
    origins = [o.region for o in TOPO.origins]
    widest = [client_cell({"ok": True, "pop": max(pops, key=len), "origin": max(origins, key=len)}, 99)]
    return [widest * len(TOPO.clients),
            [client_cell(None, 0)] * len(TOPO.clients),
            [client_cell({"ok": False}, 3)] * len(TOPO.clients),
            [client_cell({"ok": True, "pop": p, "origin": o}, n) for p, o, n in zip(pops, origins * 2, (0, 1, 12))]]


def test_every_cell_fits_its_column_and_rows_line_up_with_the_header() -> None:
    cols = Columns.for_topology(TOPO)
    header, rule = cols.header()
    starts = [i for i in range(len(rule)) if rule[i] == "-" and (i == 0 or rule[i - 1] == " ")]
    assert len(starts) == 2 + len(TOPO.clients)  # time, one per client, announced at
    for i, start in enumerate(starts[1:]):  # the time column is right-aligned
        assert header[start] != " " and header[start - 1] == " ", (i, header)
    for cells in cells_for_every_case():
        assert all(len(c) <= cols.width for c in cells), cells  # nothing is cut for a real name
        row = cols.row(12.34, cells, "sjc fra sin")
        for start, cell in zip(starts[1:], cells):
            assert row[start:start + len(cell)] == cell, (row, cell)
        assert row[starts[-1]:] == "sjc fra sin"


def test_a_cell_too_wide_is_cut_not_spilled() -> None:
    assert fit("sjc -> us-west", 30) == "sjc -> us-west".ljust(30)
    assert fit("x" * 40, 10) == "x" * 9 + "~"
    assert client_cell({"ok": True, "pop": "sjc", "origin": "us-west"}, 2) == "sjc -> us-west (2 lost)"


def test_where_to_look_names_commands_that_reach_the_live_lab() -> None:
    lines = "\n".join(where_to_look(TOPO))
    assert "-m lab status" in lines
    assert f"anycastctl status --url https://{TOPO.controller_address}:9800" in lines
    for pop in TOPO.pops:
        assert f"agent status --socket {ROOT / pop.agent / 'state' / 'agent.sock'}" in lines
        assert f"http://{pop.mgmt_address}:9701/metrics" in lines
    assert "query=ALERTS" in lines
