"""systemd's notify protocol (READY=1, WATCHDOG=1, STATUS=...), without a dependency.

Both daemons use it, so it lives beside them rather than in either (the controller must not
import the agent). The agent runs as ExaBGP's child, so its unit sets ``NotifyAccess=all``.
Outside systemd (no NOTIFY_SOCKET) every call is a no-op.
"""

from __future__ import annotations

import os
import socket


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        self._address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        if self._address.startswith("@"):  # abstract namespace socket
            self._address = "\0" + self._address[1:]

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def notify(self, **fields: str) -> bool:
        """Send ``KEY=value`` lines; True if sent. Errors never break the daemon."""
        if not self._address:
            return False
        message = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.sendto(message, self._address)
            return True
        except OSError:
            return False

    def watchdog_interval(self) -> float | None:
        """Half the unit's WatchdogSec, if systemd asked this process for pings."""
        usec = os.environ.get("WATCHDOG_USEC")
        if not usec or not self._address:
            return None
        try:
            return int(usec) / 2e6
        except ValueError:
            return None
