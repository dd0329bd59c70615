"""``python -m lab up | status | exec | down`` as a user types them, with its own prefix."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lab.netns import list_netns

pytestmark = pytest.mark.lab
PREFIX = "t-cli-"
ENV = {**os.environ, "ANYCAST_LAB_PREFIX": PREFIX}


def lab(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lab", *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def test_up_status_exec_down_leave_nothing_behind(lab_preflight: None) -> None:
    try:
        up = lab("up")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "http://192.0.2.11:9701/metrics" in up.stdout  # where to scrape each daemon
        assert lab("up").returncode == 1  # already up: refused, nothing touched
        status = lab("status")
        assert status.returncode == 0, status.stderr
        for pop in ("sjc", "fra", "sin"):
            assert f"{pop}  198.51.100.10 announced" in status.stdout, status.stdout
        assert "c-eu  (t-eu) 198.51.100.10 via AS path 65002 65101" in status.stdout
        request = lab("exec", "c-eu", sys.executable, "-m", "lab.client", "--vip", "198.51.100.10",
                      "--out", "/dev/stdout", "--duration", "0.2")
        answers = [json.loads(line) for line in request.stdout.splitlines()]
        assert answers and all(a["ok"] and a["origin"] == "us-west" for a in answers), request.stdout
        assert answers[0]["peer"] == "100.64.10.12"  # the request entered at fra's agent host
        assert lab("exec", "no-such-node", "true").returncode == 2
        # exec enters all of the node's namespaces: its hostname, its processes, its FRR.
        assert lab("exec", "rtr-sjc", "hostname").stdout.strip() == "rtr-sjc"
        summary = json.loads(lab("exec", "rtr-sjc", "vtysh", "-c", "show bgp ipv4 unicast summary json").stdout)
        assert summary["as"] == 65001 and len(summary["peers"]) == 2, summary  # its transit and its agent
        assert all(p["state"] == "Established" for p in summary["peers"].values()), summary
        rtr_ps = lab("exec", "rtr-sjc", "ps", "-e", "-o", "args=").stdout
        assert "/usr/lib/frr/bgpd" in rtr_ps and "anycast-agent" not in rtr_ps and "lab.client" not in rtr_ps
        assert "/usr/lib/frr/bgpd" not in lab("exec", "c-eu", "ps", "-e", "-o", "args=").stdout
    finally:
        down = lab("down")
    assert down.returncode == 0, down.stdout + down.stderr
    assert not [n for n in list_netns() if n.startswith(PREFIX)]
    assert lab("status").returncode == 1
    leftovers = subprocess.run(["pgrep", "-f", f"anycast-lab/{PREFIX.rstrip('-')}"], capture_output=True, text=True)
    assert leftovers.stdout == "", f"processes left running: {leftovers.stdout}"
