"""BIRD 2 as a lab router: ``bird -f -c CONF -s SOCK -P PIDFILE`` inside a namespace.

Debian's ``bird2`` (2.0.12). Each instance keeps its config, control socket, pid file and log
under its work dir, so several run side by side. BIRD has no JSON output: `route` parses
``birdc show route for PREFIX all`` into the few fields the tests compare (presence, AS
path, MED, communities, large communities), and `protocol_state` reads ``show protocols``.
Started in the foreground (``-f``) so the PID the namespace records is BIRD's own.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .netns import LabError, Netns
from .poll import wait_for

BIRD = "/usr/sbin/bird"
BIRDC = "/usr/sbin/birdc"


class BirdError(LabError):
    """BIRD failed to start or to answer; the message carries its log."""


def bird_available() -> str | None:
    """None if BIRD 2 can run here, else why not (for a preflight that fails, not skips)."""
    for tool in (BIRD, BIRDC):
        if shutil.which(tool) is None:
            return f"{tool} is missing (apt-get install bird2)"
    return None


@dataclass(frozen=True)
class BirdRoute:
    """What the tests compare of BIRD's best path for a prefix."""

    prefix: str
    as_path: tuple[int, ...]
    med: int | None
    communities: tuple[tuple[int, int], ...]
    large_communities: tuple[tuple[int, int, int], ...]
    stale: bool
    raw: str = field(compare=False, repr=False)


_PAIR = re.compile(r"\((\d+),\s*(\d+)\)")
_TRIPLE = re.compile(r"\((\d+),\s*(\d+),\s*(\d+)\)")


def parse_route(prefix: str, text: str) -> BirdRoute | None:
    """The first (best) route in ``show route for PREFIX all`` output, or None. Pure."""
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith(prefix)), None)
    if start is None:
        return None
    block = [lines[start]]
    for line in lines[start + 1:]:
        # The next route (another path, or another prefix) starts at the left margin or,
        # for a second path of the same prefix, with spaces then a route type: stop there.
        if line and not line[0].isspace():
            break
        block.append(line)
    attrs: dict[str, str] = {}
    for line in block[1:]:
        key, sep, value = line.strip().partition(":")
        if sep and key.startswith("BGP."):
            attrs[key] = value.strip()
    med = attrs.get("BGP.med")
    return BirdRoute(
        prefix=prefix,
        as_path=tuple(int(a) for a in attrs.get("BGP.as_path", "").split()),
        med=int(med) if med is not None else None,
        communities=tuple((int(a), int(b)) for a, b in _PAIR.findall(attrs.get("BGP.community", ""))),
        large_communities=tuple((int(a), int(b), int(c))
                                for a, b, c in _TRIPLE.findall(attrs.get("BGP.large_community", ""))),
        stale="stale" in block[0],
        raw="\n".join(block),
    )


class BirdRouter:
    """One BIRD instance in `netns`, its files under `workdir`."""

    def __init__(self, netns: Netns, workdir: Path, config: str) -> None:
        self.netns = netns
        self.workdir = Path(workdir)
        self.config = config
        self.conf = self.workdir / "bird.conf"
        self.sock = self.workdir / "bird.ctl"
        self.pidfile = self.workdir / "bird.pid"
        self.log = self.workdir / "bird.log"
        self.proc: subprocess.Popen[Any] | None = None

    def start(self, timeout: float = 30.0) -> BirdRouter:
        """Check the config (``bird -p``), start BIRD and wait until its socket answers."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(self.config)
        check = self.netns.run([BIRD, "-p", "-c", str(self.conf)], check=False)
        if check.returncode != 0:
            raise BirdError(f"[{self.netns.name}] bird.conf rejected: {check.stderr.strip()}")
        out = open(self.workdir / "bird.out", "ab")  # noqa: SIM115 - owned by the process
        self.proc = self.netns.popen([BIRD, "-f", "-c", str(self.conf), "-s", str(self.sock),
                                      "-P", str(self.pidfile)], stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: self._answers(), timeout, desc=f"BIRD's control socket {self.sock}")
        except TimeoutError as exc:
            raise BirdError(f"[{self.netns.name}] BIRD did not start: {self.log_text()[-2000:]}") from exc
        return self

    def reconfigure(self, config: str) -> None:
        """Replace the config of the running BIRD (``birdc configure``): protocols whose
        settings changed restart, the others keep their sessions."""
        self.conf.write_text(config)
        check = self.netns.run([BIRD, "-p", "-c", str(self.conf)], check=False)
        if check.returncode != 0:
            raise BirdError(f"[{self.netns.name}] bird.conf rejected: {check.stderr.strip()}")
        self.config = config
        r = self.birdc("configure")
        if "Reconfigured" not in r.stdout and "Reconfiguration in progress" not in r.stdout:
            raise BirdError(f"[{self.netns.name}] birdc configure: {r.stdout.strip()}")

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise BirdError(f"[{self.netns.name}] BIRD exited ({self.proc.returncode}): {self.log_text()[-2000:]}")
        return self.sock.exists() and self.birdc("show status", check=False).returncode == 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.netns.terminate(self.proc.pid)

    def birdc(self, command: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([BIRDC, "-s", str(self.sock), *command.split()], capture_output=True, text=True,
                           timeout=10)
        if check and r.returncode != 0:
            raise BirdError(f"[{self.netns.name}] birdc {command}: {r.stderr.strip() or r.stdout.strip()}")
        return r

    def route(self, prefix: str) -> BirdRoute | None:
        """BIRD's best path for exactly `prefix`, or None."""
        r = self.birdc(f"show route for {prefix} all", check=False)
        if "Network not found" in r.stdout:  # birdc exits non-zero for it
            return None
        if r.returncode != 0:
            raise BirdError(f"[{self.netns.name}] birdc show route for {prefix}: {r.stderr.strip() or r.stdout.strip()}")
        return parse_route(prefix, r.stdout)

    def protocol_state(self, name: str) -> str:
        """The BGP state of protocol `name` ("Established", "Active", ...)."""
        for line in self.birdc(f"show protocols {name}").stdout.splitlines():
            fields = line.split()
            if fields and fields[0] == name:
                return fields[-1]
        raise BirdError(f"[{self.netns.name}] no protocol {name!r}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""
