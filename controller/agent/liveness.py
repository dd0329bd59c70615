"""When the agent may tell systemd's watchdog it is alive: only while ExaBGP answers.

The agent's main loop running proves little if ExaBGP is wedged (its reactor stuck, the
API pipe full): systemd would keep a service alive that announces nothing new. So the
agent sends ExaBGP a harmless command (`PROBE`) every half interval, and pings the watchdog
only while the last ``done`` for it came within the watchdog interval. Pure: the caller
gives the times.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

# Turns ExaBGP's acks on, which they already are (exabgp_api_ack=true): it changes nothing
# and ExaBGP answers it with ``done`` from its reactor, like any command.
PROBE: Final = "enable-ack"


@dataclass
class ExaBGPLiveness:
    """The round trips to ExaBGP; `interval` is the watchdog's (half of WatchdogSec)."""

    interval: float
    last_ack: float | None = None

    def acked(self, now: float) -> None:
        """ExaBGP answered ``done`` to a probe at `now`."""
        self.last_ack = now

    def alive(self, now: float) -> bool:
        """True if ExaBGP answered a probe within the last interval (a ping is deserved)."""
        return self.last_ack is not None and 0 <= now - self.last_ack <= self.interval

    def probe_every(self) -> float:
        """How often to probe: twice per interval, so one slow answer does not miss a ping."""
        return self.interval / 2
