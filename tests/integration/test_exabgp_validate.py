"""The rendered ExaBGP config and environment, checked by the real ExaBGP 5 (`exabgp validate`, `exabgp env`)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from controller.bgp.exabgp_config import exabgp_environment, render_exabgp_config
from tests.helpers.exabgp_neighbors import NEIGHBORS

EXABGP = Path(sys.executable).with_name("exabgp")

def _validate(config: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "exabgp.conf"
    path.write_text(config)
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **exabgp_environment()}
    return subprocess.run([str(EXABGP), "validate", "--neighbor", str(path)], env=env, capture_output=True, text=True, timeout=60)

def test_real_exabgp_validate_accepts_the_rendered_config(tmp_path: Path) -> None:
    # ExaBGP checks that the run program exists and is executable, so use a real one.
    config = render_exabgp_config(NEIGHBORS, "anycast-agent", [sys.executable, "-m", "controller.cli.agent_main"])
    result = _validate(config, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    # Both neighbours were parsed, not just the file opened.
    out = result.stdout + result.stderr
    assert "neighbor  100.64.1.1" in out and "neighbor  fd00:64:1::1" in out

def test_exabgp_validate_does_reject_a_broken_config(tmp_path: Path) -> None:
    # Proves the test above can fail: ExaBGP refuses a hold time of 1 s.
    config = render_exabgp_config(NEIGHBORS, "anycast-agent", [sys.executable]).replace("hold-time 9;", "hold-time 1;")
    result = _validate(config, tmp_path)
    assert result.returncode != 0
    assert "holdtime" in result.stderr

def test_real_exabgp_reads_the_environment() -> None:
    # `exabgp env` prints the settings ExaBGP resolved; each of ours must show up.
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **exabgp_environment("/var/log/anycast/exabgp.log")}
    out = subprocess.run([str(EXABGP), "env"], env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    sections: dict[str, dict[str, str]] = {}
    section = ""
    for line in out.splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif " = " in line:
            key, value = line.split(" = ", 1)
            sections.setdefault(section, {})[key] = value.strip("'")
    for name, value in exabgp_environment("/var/log/anycast/exabgp.log").items():
        _, group, key = name.split("_", 2)
        assert sections[f"exabgp.{group}"][key].lower() == value.lower(), name

_LOG_PROBE = """
from exabgp.environment import getenv
from exabgp.logger import log
from exabgp.reactor.api import API
from exabgp.configuration.configuration import Configuration
log.init(getenv())
api = API(Configuration([]))
[change] = api.api_route("announce route 198.51.100.10/32 next-hop 100.64.1.2 med 100")
api.log_message(f"route added to neighbor 100.64.1.1 : {change.extensive()}")  # what ExaBGP logs per route
log.warning(lambda: "lost TCP session with peer 100.64.1.1", "network")
log.info(lambda: "connected to peer 100.64.1.1", "reactor")
"""


def test_exabgp_with_our_environment_logs_sessions_but_not_every_route(tmp_path: Path) -> None:
    # One INFO line per route change was ~1/3 of ExaBGP's CPU at a 10,000-VIP cold start
    # (results/README.md section 11): with our settings ExaBGP's own logger drops it and keeps
    # the session lines.
    log_file = tmp_path / "exabgp.log"
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **exabgp_environment(str(log_file))}
    subprocess.run([sys.executable, "-c", _LOG_PROBE], env=env, capture_output=True, text=True, timeout=60, check=True)
    text = log_file.read_text()
    assert "lost TCP session" in text and "connected to peer" in text
    assert "route added" not in text and "198.51.100.10" not in text
    # The probe can fail: with ExaBGP's default for that source the route line is logged.
    env["exabgp_log_processes"] = "true"
    log_file.unlink()
    subprocess.run([sys.executable, "-c", _LOG_PROBE], env=env, capture_output=True, text=True, timeout=60, check=True)
    assert "route added to neighbor 100.64.1.1 : 198.51.100.10/32" in log_file.read_text()
