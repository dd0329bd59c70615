"""What every console entry point shares: exit codes, ``--version``, ``--log-level``, and an
argument parser whose usage errors exit with ``Exit.USAGE`` (argparse's own 2 would collide
with ``Exit.CHANGES``).

Exit codes (documented in the README, "Scripting anycastctl"):

====  ===========  =====================================================================
code  name         meaning
====  ===========  =====================================================================
0     OK           done; for ``diff``: no change at any POP
1     ERROR        failed (an invalid config, a refused request, a controller error; for
                   ``diff --budget``: the change is over the blast-radius budget)
2     CHANGES      ``diff`` only: the change does something somewhere (as
                   ``terraform plan -detailed-exitcode``; ``--detailed-exitcode`` is
                   accepted and changes nothing)
3     NOT_FOUND    the controller does not know that POP or VIP
4     UNREACHABLE  no answer from the controller (refused, timed out, no route, bad host)
5     BAD_ANSWER   something answered, but not the controller's API (not JSON, wrong shape:
                   often ``--url`` names the metrics port or another service)
6     DENIED       the token was refused (HTTP 401/403)
64    USAGE        bad flags or arguments (sysexits' EX_USAGE)
70    INTERNAL     a bug in anycastctl: the one-line error says what to report
====  ===========  =====================================================================
"""

from __future__ import annotations

import argparse
import enum
import sys
from typing import NoReturn

from .. import __version__

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class Exit(enum.IntEnum):
    OK = 0
    ERROR = 1
    CHANGES = 2
    NOT_FOUND = 3
    UNREACHABLE = 4
    BAD_ANSWER = 5
    DENIED = 6
    USAGE = 64
    UNAVAILABLE = 69  # sysexits EX_UNAVAILABLE: a daemon cannot bind its listen address
    INTERNAL = 70


class Parser(argparse.ArgumentParser):
    """argparse with usage errors on ``Exit.USAGE`` and sub-parsers of the same kind."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(Exit.USAGE, f"{self.prog}: error: {message}\n")


def new_parser(prog: str, description: str) -> Parser:
    p = Parser(prog=prog, description=description)
    p.add_argument("--version", action="version", version=f"{prog} {__version__}")
    return p


def log_level(text: str) -> str:
    """``--log-level``: a level name in any case (returned upper-case, as logging and the
    agent's own ``run`` line take it); anything else is a usage error, not a traceback."""
    name = text.upper()
    if name not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(LOG_LEVELS)}")
    return name


def add_log_level(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-level", type=log_level, default="INFO", metavar="LEVEL",
                   help=f"{', '.join(LOG_LEVELS)} (any case; default INFO)")
