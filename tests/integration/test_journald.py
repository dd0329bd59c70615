"""The daemons' log lines in a REAL journal: priorities and the VIP/POP/REASON fields.

PID 1 is not systemd on this machine, but systemd-journald runs on its own: each test starts
one in a private mount namespace (``unshare --mount``, a tmpfs over /run, so its sockets and
its volatile journal under /run/log/journal are this test's alone; reading the kernel log
and every forwarding off), runs a process the way a unit's ``StandardError=journal`` does
(``systemd-cat`` connects its stdout and stderr to the journal's stream socket, and
``JOURNAL_STREAM`` names that socket, as systemd sets it), and reads the journal back with
``journalctl -o json``. Two paths of ``controller.logs``: the ``<N>`` prefix on the stream
(no python3-systemd), and python3-systemd's ``journal.send`` with fields of their own.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
JOURNALD = "/lib/systemd/systemd-journald"
# Debian's python3-systemd (apt), built for Python 3.11 like the venv's interpreter.
SYSTEMD_PY = Path("/usr/lib/python3/dist-packages/systemd")

EMIT = """\
import logging
from controller import logs
logs.setup("anycast-agent", "INFO")
log = logging.getLogger("controller.agent")
log.info("VIP web: announce", extra={"vip": "web", "pop": "sjc", "reason": "healthy"})
log.warning("VIP web: withdraw", extra={"vip": "web", "pop": "sjc", "reason": "backend_down"})
try:
    1 / 0
except ZeroDivisionError:
    log.exception("reconcile pass failed")
"""

SCRIPT = """\
set -e
mount -t tmpfs tmpfs /run
mkdir -p /run/systemd/journal /run/log/journal /run/systemd/journald.conf.d
printf '[Journal]\\nStorage=volatile\\nReadKMsg=no\\nForwardToSyslog=no\\nForwardToKMsg=no\\nForwardToConsole=no\\nForwardToWall=no\\n' \\
  > /run/systemd/journald.conf.d/test.conf
{journald} & J=$!
while [ ! -S /run/systemd/journal/stdout ] || [ ! -S /run/systemd/journal/socket ]; do sleep 0.02; done
systemd-cat -t anycast-agent sh -c 'JOURNAL_STREAM=$(stat -L -c %d:%i /proc/self/fd/2) exec "$0" "$1"' {python} {emit}
until journalctl -D /run/log/journal -o json --no-pager | grep -q 'reconcile pass failed'; do sleep 0.02; done
journalctl -D /run/log/journal -o json --no-pager -t anycast-agent > {out}
journalctl -D /run/log/journal -o json --no-pager -t anycast-agent -p warning > {warnings}
kill $J
wait $J || true
"""


def journal(tmp_path: Path, pythonpath: list[Path]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Run EMIT under a private journald; its entries, and those ``journalctl -p warning`` finds."""
    for tool in (JOURNALD, "unshare", "systemd-cat", "journalctl"):
        assert shutil.which(tool), f"{tool} is missing (Debian's systemd and util-linux)"
    emit, out, warnings = tmp_path / "emit.py", tmp_path / "journal.json", tmp_path / "warnings.json"
    emit.write_text(EMIT)
    script = SCRIPT.format(journald=JOURNALD, python=sys.executable, emit=emit, out=out, warnings=warnings)
    env = {k: v for k, v in os.environ.items() if k not in ("JOURNAL_STREAM", "NOTIFY_SOCKET")}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in pythonpath)
    r = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr

    def entries(path: Path) -> list[dict[str, Any]]:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    return entries(out), entries(warnings)




def test_the_stream_prefix_files_each_line_under_its_priority(tmp_path: Path) -> None:
    entries, warnings = journal(tmp_path, [REPO])
    assert all(e["_TRANSPORT"] == "stdout" for e in entries)
    messages = {e["MESSAGE"]: e["PRIORITY"] for e in entries}
    assert messages["INFO controller.agent: VIP web: announce vip=web pop=sjc reason=healthy"] == "6"
    assert messages["WARNING controller.agent: VIP web: withdraw vip=web pop=sjc reason=backend_down"] == "4"
    assert messages["ERROR controller.agent: reconcile pass failed"] == "3"
    assert messages["ZeroDivisionError: division by zero"] == "3"  # every traceback line, not only the first
    # journalctl -p warning: the warning and the error with its traceback, not the info line.
    found = [e["MESSAGE"] for e in warnings]
    assert "WARNING controller.agent: VIP web: withdraw vip=web pop=sjc reason=backend_down" in found
    assert "ZeroDivisionError: division by zero" in found
    assert not any(m.startswith("INFO") for m in found)


def test_with_python3_systemd_vip_pop_and_reason_are_journal_fields(tmp_path: Path) -> None:
    assert SYSTEMD_PY.is_dir(), f"{SYSTEMD_PY} is missing (apt-get install python3-systemd: make system-deps)"
    # Only the systemd package on the path, not the rest of Debian's dist-packages.
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / "systemd").symlink_to(SYSTEMD_PY)
    entries, warnings = journal(tmp_path, [REPO, tmp_path / "sp"])
    withdraw = next(e for e in entries if e["MESSAGE"] == "VIP web: withdraw")
    assert withdraw["_TRANSPORT"] == "journal"  # journal.send, not the stream
    assert {k: withdraw[k] for k in ("PRIORITY", "VIP", "POP", "REASON", "SYSLOG_IDENTIFIER", "LOGGER")} == {
        "PRIORITY": "4", "VIP": "web", "POP": "sjc", "REASON": "backend_down",
        "SYSLOG_IDENTIFIER": "anycast-agent", "LOGGER": "controller.agent"}
    announce = next(e for e in entries if e["MESSAGE"] == "VIP web: announce")
    assert (announce["PRIORITY"], announce["REASON"]) == ("6", "healthy")
    failed = next(e for e in entries if str(e["MESSAGE"]).startswith("reconcile pass failed"))
    assert failed["PRIORITY"] == "3" and "ZeroDivisionError" in failed["MESSAGE"]  # one entry, traceback inside
    assert "VIP" not in failed
    assert sorted(e["MESSAGE"].split("\n")[0] for e in warnings) == ["VIP web: withdraw", "reconcile pass failed"]
