"""Logging for both daemons: syslog priorities and fields under journald, plain text elsewhere.

Under systemd the daemons' stderr is a journal stream (``JOURNAL_STREAM`` names it). A
``<N>`` prefix on each line is the syslog priority journald files the line under, so
``journalctl -p warning`` finds our warnings. If python3-systemd is importable the records go
to the journal directly, with ``VIP``, ``POP`` and ``REASON`` as fields of their own
(``journalctl VIP=web``). The fields come from ``extra={"vip": ..., "pop": ..., "reason": ...}``
and are appended as ``key=value`` to the text in the other two formats.
"""

from __future__ import annotations

import enum
import importlib
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, Final, TextIO

# The record attributes that become journal fields (and key=value suffixes), in this order.
FIELDS: Final = ("vip", "pop", "reason")

# logging's levels to syslog's priorities (sd-daemon(3)).
_PRIORITY: Final = ((logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6))


def syslog_priority(levelno: int) -> int:
    """The syslog priority for a logging level: critical 2, error 3, warning 4, info 6, debug 7."""
    for level, priority in _PRIORITY:
        if levelno >= level:
            return priority
    return 7


def record_fields(record: logging.LogRecord) -> dict[str, str]:
    """The structured fields a record carries (given through ``extra=``), empty ones left out."""
    out: dict[str, str] = {}
    for name in FIELDS:
        value = getattr(record, name, None)
        if isinstance(value, enum.Enum):
            value = value.value
        if value is not None and value != "":
            out[name] = str(value)
    return out


class FieldsFormatter(logging.Formatter):
    """The plain format with the record's fields appended as ``key=value``."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = record_fields(record)
        if not fields:
            return text
        return text + " " + " ".join(f"{k}={v}" for k, v in fields.items())


class JournalStreamFormatter(FieldsFormatter):
    """``<N>`` before every line (sd-daemon(3)): journald reads it as the syslog priority and
    strips it. Each line of a traceback gets it, as journald stores each line as one entry."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        return "\n".join(prefix + line for line in super().format(record).split("\n"))


def under_journal(stream: TextIO, environ: Mapping[str, str]) -> bool:
    """True if `stream` is the journal stream systemd gave us (``JOURNAL_STREAM=dev:inode``)."""
    value = environ.get("JOURNAL_STREAM", "")
    device, _, inode = value.partition(":")
    if not device.isdigit() or not inode.isdigit():
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (int(device), int(inode))


def _journal_handler(identifier: str) -> logging.Handler | None:
    try:
        journal: Any = importlib.import_module("systemd.journal")  # python3-systemd, optional
    except ImportError:
        return None

    class _Handler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            try:
                fields = {k.upper(): v for k, v in record_fields(record).items()}
                journal.send(self.format(record), PRIORITY=str(syslog_priority(record.levelno)),
                             SYSLOG_IDENTIFIER=identifier, LOGGER=record.name, **fields)
            except Exception:  # noqa: BLE001 - logging must never take the daemon down
                self.handleError(record)

    handler = _Handler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    return handler


def setup(identifier: str, level: str | int, stream: TextIO | None = None,
          environ: Mapping[str, str] | None = None) -> logging.Handler:
    """Configure the root logger for daemon `identifier` (e.g. ``anycast-agent``); returns the handler."""
    stream = stream if stream is not None else sys.stderr
    environ = environ if environ is not None else os.environ
    handler: logging.Handler | None = None
    if under_journal(stream, environ):
        handler = _journal_handler(identifier)
        if handler is None:
            # journald adds the timestamp and the PID itself.
            handler = logging.StreamHandler(stream)
            handler.setFormatter(JournalStreamFormatter("%(levelname)s %(name)s: %(message)s"))
    if handler is None:
        handler = logging.StreamHandler(stream)
        handler.setFormatter(FieldsFormatter(
            f"%(asctime)s {identifier}[%(process)d] %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
