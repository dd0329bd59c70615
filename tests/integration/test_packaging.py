"""What an operator installs: console scripts, the rendered ExaBGP config, the systemd unit."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def test_agent_renders_an_exabgp_config_that_exabgp_accepts(tmp_path: Path) -> None:
    out = tmp_path / "exabgp.conf"
    r = subprocess.run([str(BIN / "anycast-agent"), "exabgp-config", "--config", str(ROOT / "configs/agent-sjc.yaml"),
                        "--state-dir", "/var/lib/x", "--out", str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    text = out.read_text()
    assert "neighbor 100.64.1.1" in text and "peer-as 65001;" in text and "local-as 65101;" in text
    # ExaBGP runs the agent with the same config and overrides.
    assert f"run {sys.executable} -m controller.cli.agent_main run --config {ROOT}/configs/agent-sjc.yaml" \
           f" --state-dir /var/lib/x" in text
    v = subprocess.run([str(BIN / "exabgp"), "validate", str(out)], capture_output=True, text=True, timeout=60)
    assert v.returncode == 0, v.stdout + v.stderr


def test_agent_refuses_to_start_on_a_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "agent.yaml"
    bad.write_text((ROOT / "configs/agent-sjc.yaml").read_text().replace("rise: 2", "rise: 0"))
    r = subprocess.run([str(BIN / "anycast-agent"), "launch", "--config", str(bad)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "vips[0].check.rise: must be >= 1, got 0" in r.stderr


def test_systemd_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    """The units reference /opt/anycast/bin; point that at this venv and let systemd check them."""
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing (Debian: apt-get install systemd)"
    units = sorted((ROOT / "systemd").glob("*.service"))
    assert units
    for unit in units:
        text = unit.read_text().replace("/opt/anycast/bin/", f"{BIN}/")
        copy = tmp_path / unit.name
        copy.write_text(text)
        r = subprocess.run([analyze, "verify", str(copy)], capture_output=True, text=True, timeout=60,
                           env={**os.environ, "SYSTEMD_LOG_LEVEL": "warning"})
        assert r.returncode == 0 and not r.stderr.strip(), f"{unit.name}: {r.stderr}"


def test_agent_unit_runs_launch_as_notify_service_with_few_capabilities() -> None:
    unit = (ROOT / "systemd/anycast-agent.service").read_text()
    assert "Type=notify" in unit and "NotifyAccess=all" in unit  # the agent is ExaBGP's child
    assert "anycast-agent launch --config /etc/anycast/agent.yaml" in unit
    assert "CapabilityBoundingSet=CAP_NET_ADMIN CAP_NET_BIND_SERVICE\n" in unit
    assert "ProtectSystem=strict" in unit and "WatchdogSec=" in unit
    # ExaBGP exits 0 when it gives up respawning a crashing agent: that must restart too.
    assert "\nRestart=always\n" in unit and "Restart=on-failure" not in unit
    assert "\nStartLimitBurst=" in unit.split("[Service]")[0]  # a start limit belongs in [Unit]
    # The agent stops first, while ExaBGP still takes its withdrawals (graceful shutdown).
    assert "\nExecStop=/opt/anycast/bin/anycast-agent stop --config /etc/anycast/agent.yaml " in unit


def test_validate_console_script_touches_nothing(tmp_path: Path) -> None:
    """Run as a user would: the installed console script, on a config whose state_dir
    does not exist; validating must not create it."""
    d = yaml.safe_load((ROOT / "configs/agent-sjc.yaml").read_text())
    d["state_dir"] = str(tmp_path / "state")
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(yaml.safe_dump(d))
    r = subprocess.run([str(BIN / "anycastctl"), "validate", str(cfg)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert not (tmp_path / "state").exists()


def test_every_binary_tells_its_version() -> None:
    from controller import __version__

    for name in ("anycastctl", "anycast-agent", "anycast-controller"):
        r = subprocess.run([str(BIN / name), "--version"], capture_output=True, text=True, timeout=60)
        assert (r.returncode, r.stdout.strip()) == (0, f"{name} {__version__}"), r.stderr


def test_daemons_refuse_a_bad_log_level_as_a_usage_error() -> None:
    for argv in (["anycast-agent", "run", "--config", "x.yaml", "--log-level", "loud"],
                 ["anycast-controller", "--config-dir", ".", "--log-level", "loud"],
                 ["anycast-controller", "--config-dir", ".", "--listen", "9800"]):
        r = subprocess.run([str(BIN / argv[0]), *argv[1:]], capture_output=True, text=True, timeout=60)
        assert r.returncode == 64 and "Traceback" not in r.stderr and "error: argument" in r.stderr, r.stderr


def test_anycastctl_completes_in_the_shell(tmp_path: Path) -> None:
    """What bash asks through `eval "$(register-python-argcomplete anycastctl)"`."""
    out = tmp_path / "completions"

    def complete(line: str) -> list[str]:
        env = {**os.environ, "_ARGCOMPLETE": "1", "_ARGCOMPLETE_IFS": "\n", "COMP_LINE": line,
               "COMP_POINT": str(len(line)), "COMP_TYPE": "9", "_ARGCOMPLETE_STDOUT_FILENAME": str(out)}
        subprocess.run([str(BIN / "anycastctl")], env=env, capture_output=True, timeout=60, check=True)
        return [c.strip() for c in out.read_text().split("\n")]

    assert set(complete("anycastctl dr")) == {"drain"}
    assert "--detailed-exitcode" in complete("anycastctl diff --de")
    r = subprocess.run([str(BIN / "register-python-argcomplete"), "anycastctl"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0 and "complete " in r.stdout and "anycastctl" in r.stdout
