"""Journal-friendly logs: syslog priorities, structured fields, the journal-stream check."""

from __future__ import annotations

import io
import logging
import os
from pathlib import Path

import pytest

from controller import logs


def record(level: int, msg: str, **extra: object) -> logging.LogRecord:
    r = logging.LogRecord("controller.agent", level, __file__, 1, msg, (), None)
    for k, v in extra.items():
        setattr(r, k, v)
    return r


@pytest.mark.parametrize(("level", "priority"), [
    (logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4), (logging.INFO, 6), (logging.DEBUG, 7),
    (logging.WARNING + 5, 4), (5, 7),
])
def test_syslog_priorities(level: int, priority: int) -> None:
    assert logs.syslog_priority(level) == priority


def test_journal_stream_format_prefixes_every_line_with_the_priority() -> None:
    f = logs.JournalStreamFormatter("%(levelname)s %(name)s: %(message)s")
    assert f.format(record(logging.WARNING, "x down", vip="web", pop="sjc", reason="health_down")) == (
        "<4>WARNING controller.agent: x down vip=web pop=sjc reason=health_down")
    two = f.format(record(logging.ERROR, "a\nb"))
    assert two.split("\n") == ["<3>ERROR controller.agent: a", "<3>b"]


def test_fields_are_appended_in_a_fixed_order_and_empty_ones_left_out() -> None:
    f = logs.FieldsFormatter("%(message)s")
    assert f.format(record(logging.INFO, "m", reason="drain", vip="api", pop="")) == "m vip=api reason=drain"
    assert f.format(record(logging.INFO, "m")) == "m"


def test_setup_plain_outside_systemd_and_prefixed_under_journald(tmp_path: Path) -> None:
    with open(tmp_path / "stream", "w+", encoding="utf-8") as stream:
        st = os.fstat(stream.fileno())
        plain = logs.setup("anycast-agent", "INFO", stream, {})
        assert type(plain.formatter) is logs.FieldsFormatter
        assert not logs.under_journal(stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino + 1}"})
        journal = logs.setup("anycast-agent", "INFO", stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert logging.getLogger().handlers == [journal]
        logging.getLogger("controller.agent").warning("VIP down", extra={"vip": "web", "reason": "health_down"})
        stream.flush()
        stream.seek(0)
        assert stream.read() == "<4>WARNING controller.agent: VIP down vip=web reason=health_down\n"
    logging.getLogger().removeHandler(journal)


def test_a_stream_without_a_descriptor_is_not_the_journal() -> None:
    assert not logs.under_journal(io.StringIO(), {"JOURNAL_STREAM": "1:2"})
    assert not logs.under_journal(io.StringIO(), {"JOURNAL_STREAM": "garbage"})


def test_enum_fields_are_logged_by_value() -> None:
    import enum

    class Why(enum.Enum):
        DRAIN = "drain"

    assert logs.record_fields(record(logging.INFO, "m", reason=Why.DRAIN)) == {"reason": "drain"}


def test_journal_handler_sends_priority_and_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With python3-systemd importable, records go to the journal with VIP/POP/REASON fields."""
    import sys
    import types

    sent: list[tuple[str, dict[str, str]]] = []
    journal = types.ModuleType("systemd.journal")
    journal.send = lambda message, **fields: sent.append((message, fields))  # type: ignore[attr-defined]
    package = types.ModuleType("systemd")
    package.journal = journal  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "systemd", package)
    monkeypatch.setitem(sys.modules, "systemd.journal", journal)
    with open(tmp_path / "stream", "w", encoding="utf-8") as stream:
        st = os.fstat(stream.fileno())
        handler = logs.setup("anycast-agent", "INFO", stream, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        try:
            logging.getLogger("controller.agent").error("refused", extra={"vip": "web", "pop": "sjc"})
        finally:
            logging.getLogger().removeHandler(handler)
    assert sent == [("refused", {"PRIORITY": "3", "SYSLOG_IDENTIFIER": "anycast-agent",
                                 "LOGGER": "controller.agent", "VIP": "web", "POP": "sjc"})]
