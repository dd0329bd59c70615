"""ExaBGPSpeaker over in-memory streams: acks in order, events, garbage, EOF, timeouts."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import pytest

from controller.bgp.exabgp_api import Event, NeighborState, RouteAttributes, RouteChange, Shutdown
from controller.bgp.speaker import ExaBGPSpeaker, SpeakerClosed, pipelined, send_changes

T = TypeVar("T")

UP = (
    '{ "exabgp": "5.0.0", "time": 1795392790.1, "host" : "vm", "pid" : 1, "ppid" : 1, "counter": 2, "type": "state",'
    ' "neighbor": { "address": { "local": "100.64.1.2", "peer": "100.64.1.1" }, "asn": { "local": 65101,'
    ' "peer": 65000 }, "router-id": "100.64.1.2" , "state": "up" } }'
)
SHUTDOWN = '{ "exabgp": "5.0.0", "time": 1.0, "host" : "vm", "pid" : 1, "ppid" : 1, "type": "notification", "notification": "shutdown" }'


class FakeWriter:
    """Records what the speaker wrote; can be told to fail like a broken pipe."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.fail: Exception | None = None

    def write(self, data: bytes) -> None:
        self.lines.extend(data.decode().splitlines())

    async def drain(self) -> None:
        if self.fail is not None:
            raise self.fail


class Harness:
    def __init__(
        self,
        *,
        ack: bool = True,
        ack_timeout: float = 5.0,
        limit: int = 2**16,
        on_event: Callable[[Event], None] | None = None,
    ) -> None:
        self.reader = asyncio.StreamReader(limit=limit)
        self.writer = FakeWriter()
        self.events: list[Event] = []
        self.raw: list[str] = []
        self.speaker = ExaBGPSpeaker(
            self.reader,
            self.writer,
            on_event=on_event or self.events.append,
            ack=ack,
            ack_timeout=ack_timeout,
            on_line=self.raw.append,
        )

    def feed(self, *lines: str) -> None:
        self.reader.feed_data("".join(f"{line}\n" for line in lines).encode())

    async def settle(self) -> None:
        """Let every ready task run (no wall-clock sleeping)."""
        for _ in range(10):
            await asyncio.sleep(0)


def run(test: Callable[[], Awaitable[T]]) -> T:
    return asyncio.run(test())  # type: ignore[arg-type]


def test_acks_are_matched_to_commands_in_order() -> None:
    async def scenario() -> list[bool]:
        h = Harness()
        reader = asyncio.create_task(h.speaker.run_reader())
        sends = [asyncio.create_task(h.speaker.send(f"announce route 198.51.100.{i}/32 next-hop self")) for i in (1, 2, 3)]
        await h.settle()
        assert h.writer.lines == [f"announce route 198.51.100.{i}/32 next-hop self" for i in (1, 2, 3)]
        h.feed("done", "done", "error")
        results = await asyncio.gather(*sends)
        h.reader.feed_eof()
        await reader
        return results

    assert run(scenario) == [True, True, False]


def test_error_ack_returns_false_and_the_speaker_keeps_working() -> None:
    async def scenario() -> tuple[bool, bool]:
        h = Harness()
        reader = asyncio.create_task(h.speaker.run_reader())
        first = asyncio.create_task(h.speaker.send("bogus command"))
        await h.settle()
        h.feed("error")
        bad = await first
        second = asyncio.create_task(h.speaker.send("withdraw route 198.51.100.1/32"))
        await h.settle()
        h.feed("done")
        good = await second
        h.reader.feed_eof()
        await reader
        return bad, good

    assert run(scenario) == (False, True)


def test_a_cancelled_sender_keeps_its_place_in_the_ack_queue() -> None:
    # The first command was written; its ack will still come and must not be taken
    # as the answer to the second command.
    async def scenario() -> bool:
        h = Harness()
        reader = asyncio.create_task(h.speaker.run_reader())
        first = asyncio.create_task(h.speaker.send("announce route 198.51.100.1/32 next-hop self"))
        second = asyncio.create_task(h.speaker.send("announce route 198.51.100.2/32 next-hop self med 4294967296"))
        await h.settle()
        first.cancel()
        h.feed("done", "error")
        result = await second
        h.reader.feed_eof()
        await reader
        return result

    assert run(scenario) is False


def test_events_are_dispatched_and_acks_are_not() -> None:
    async def scenario() -> Harness:
        h = Harness()
        reader = asyncio.create_task(h.speaker.run_reader())
        send = asyncio.create_task(h.speaker.send("announce route 198.51.100.1/32 next-hop self"))
        await h.settle()
        h.feed(UP, "done", SHUTDOWN)
        assert await send is True
        h.reader.feed_eof()
        await reader
        return h

    h = run(scenario)
    assert h.events == [NeighborState(peer="100.64.1.1", local="100.64.1.2", state="up"), Shutdown()]
    assert h.raw == [UP, "done", SHUTDOWN]


def test_garbage_is_logged_and_skipped(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> tuple[bool, Harness]:
        h = Harness()
        reader = asyncio.create_task(h.speaker.run_reader())
        send = asyncio.create_task(h.speaker.send("announce route 198.51.100.1/32 next-hop self"))
        await h.settle()
        h.feed("Traceback (most recent call last):", '{"half": ')
        h.reader.feed_data(b"\xff\xfe not utf-8\n")
        h.feed("done", UP)
        result = await send
        h.reader.feed_eof()
        await reader
        return result, h

    with caplog.at_level(logging.WARNING, logger="controller.bgp"):
        result, h = run(scenario)
    assert result is True  # the ack after the garbage still matched its command
    assert [type(e).__name__ for e in h.events] == ["Garbage", "Garbage", "Garbage", "NeighborState"]
    assert h.events[-1] == NeighborState(peer="100.64.1.1", local="100.64.1.2", state="up")
    warnings = [r.getMessage() for r in caplog.records if r.name == "controller.bgp" and r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert "Traceback (most recent call last):" in warnings[0]


def test_an_over_long_line_is_skipped(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> Harness:
        h = Harness(limit=64)
        reader = asyncio.create_task(h.speaker.run_reader())
        h.feed("x" * 500, '{"type": "x"}')
        h.reader.feed_eof()
        await reader
        return h

    with caplog.at_level(logging.WARNING, logger="controller.bgp"):
        h = run(scenario)
    assert any("over-long" in r.getMessage() for r in caplog.records)
    assert [type(e).__name__ for e in h.events] == ["Unknown"]


def test_eof_fails_pending_commands_and_later_ones() -> None:
    async def scenario() -> tuple[BaseException | bool, BaseException | bool]:
        h = Harness()
        reader = asyncio.create_task(h.speaker.run_reader())
        pending = asyncio.create_task(h.speaker.send("announce route 198.51.100.1/32 next-hop self"))
        await h.settle()
        h.reader.feed_eof()
        await reader  # returns: EOF is how ExaBGP going away looks
        first = (await asyncio.gather(pending, return_exceptions=True))[0]
        later = (await asyncio.gather(h.speaker.send("withdraw route 198.51.100.1/32"), return_exceptions=True))[0]
        assert h.speaker.closed
        assert h.writer.lines == ["announce route 198.51.100.1/32 next-hop self"]
        return first, later

    first, later = run(scenario)
    assert isinstance(first, SpeakerClosed) and "EOF" in str(first)
    assert isinstance(later, SpeakerClosed)


def test_ack_timeout_closes_the_speaker() -> None:
    # After a lost ack no later ack can be matched, so the speaker refuses to go on.
    async def scenario() -> tuple[BaseException | bool, BaseException | bool]:
        h = Harness(ack_timeout=0.01)
        reader = asyncio.create_task(h.speaker.run_reader())
        lost = (await asyncio.gather(h.speaker.send("announce route 198.51.100.1/32 next-hop self"), return_exceptions=True))[0]
        h.feed("done")  # the late ack must not be taken for anything
        later = (await asyncio.gather(h.speaker.send("withdraw route 198.51.100.1/32"), return_exceptions=True))[0]
        h.reader.feed_eof()
        await reader
        return lost, later

    lost, later = run(scenario)
    assert isinstance(lost, SpeakerClosed) and "no ack" in str(lost)
    assert isinstance(later, SpeakerClosed)


def test_broken_pipe_on_write_raises_speaker_closed() -> None:
    async def scenario() -> BaseException | bool:
        h = Harness()
        h.writer.fail = BrokenPipeError(32, "Broken pipe")
        result = (await asyncio.gather(h.speaker.send("withdraw route 198.51.100.1/32"), return_exceptions=True))[0]
        assert h.speaker.closed
        return result

    assert isinstance(run(scenario), SpeakerClosed)


def test_without_acks_send_returns_once_written(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> tuple[bool, Harness]:
        h = Harness(ack=False)
        reader = asyncio.create_task(h.speaker.run_reader())
        result = await h.speaker.send("announce route 198.51.100.1/32 next-hop self")
        h.feed("done")  # ExaBGP acking anyway is harmless
        h.reader.feed_eof()
        await reader
        return result, h

    with caplog.at_level(logging.WARNING, logger="controller.bgp"):
        result, h = run(scenario)
    assert result is True
    assert h.writer.lines == ["announce route 198.51.100.1/32 next-hop self"]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_ack_nobody_waits_for_is_a_warning_not_a_crash(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> bool:
        h = Harness()
        reader = asyncio.create_task(h.speaker.run_reader())
        h.feed("done")
        await h.settle()
        send = asyncio.create_task(h.speaker.send("withdraw route 198.51.100.1/32"))
        await h.settle()
        h.feed("error")
        result = await send
        h.reader.feed_eof()
        await reader
        return result

    with caplog.at_level(logging.WARNING, logger="controller.bgp"):
        assert run(scenario) is False
    assert any("no command waiting" in r.getMessage() for r in caplog.records)


def test_a_command_with_a_newline_is_refused_before_writing() -> None:
    async def scenario() -> FakeWriter:
        h = Harness()
        with pytest.raises(ValueError):
            await h.speaker.send("announce route 198.51.100.1/32 next-hop self\nwithdraw route 198.51.100.1/32")
        return h.writer

    assert run(scenario).lines == []


def test_a_failing_event_handler_stops_the_reader_and_fails_pending_commands() -> None:
    async def scenario() -> tuple[BaseException | None, BaseException | bool]:
        def broken(event: Event) -> None:
            raise RuntimeError("handler bug")

        h = Harness(on_event=broken)
        reader = asyncio.create_task(h.speaker.run_reader())
        pending = asyncio.create_task(h.speaker.send("withdraw route 198.51.100.1/32"))
        await h.settle()
        h.feed(UP)
        reader_error = (await asyncio.gather(reader, return_exceptions=True))[0]
        sent = (await asyncio.gather(pending, return_exceptions=True))[0]
        return reader_error if isinstance(reader_error, BaseException) else None, sent

    reader_error, sent = run(scenario)
    assert isinstance(reader_error, RuntimeError)
    assert isinstance(sent, SpeakerClosed)


# --- send_changes: batched, pipelined, per-route outcome (issue 13) -------------------------
class AutoAckWriter(FakeWriter):
    """ExaBGP answering each command as it is written: ``error`` if it carries `poison`."""

    def __init__(self, reader: asyncio.StreamReader, poison: str) -> None:
        super().__init__()
        self.reader, self.poison = reader, poison

    def write(self, data: bytes) -> None:
        super().write(data)
        for line in data.decode().splitlines():
            self.reader.feed_data(b"error\n" if self.poison in line.split() else b"done\n")


def _changes(n: int) -> list[RouteChange]:
    attrs = RouteAttributes(med=100)
    return [RouteChange(ipaddress.ip_network(f"198.51.100.{i}/32"), attrs) for i in range(n)]


def test_send_changes_attributes_a_refused_batch_to_its_failing_route() -> None:
    async def scenario() -> tuple[dict[int, bool], list[str]]:
        h = Harness()
        h.writer = AutoAckWriter(h.reader, "198.51.100.3/32")
        h.speaker._writer = h.writer
        reader = asyncio.create_task(h.speaker.run_reader())
        outcomes: dict[int, bool] = {}
        async for members, ok in send_changes(h.speaker.send, _changes(7), max_routes=3, window=2):
            for m in members:
                assert m not in outcomes  # every change answered exactly once
                outcomes[m] = ok
        h.reader.feed_eof()
        await reader
        return outcomes, h.writer.lines

    outcomes, lines = run(scenario)
    assert outcomes == {i: i != 3 for i in range(7)}
    assert [line.split(" nlri ")[-1] if "nlri" in line else line for line in lines] == [
        "198.51.100.0/32 198.51.100.1/32 198.51.100.2/32",
        "198.51.100.3/32 198.51.100.4/32 198.51.100.5/32",  # refused: resent one by one below
        "announce route 198.51.100.6/32 next-hop self med 100",
        *(f"announce route 198.51.100.{i}/32 next-hop self med 100" for i in (3, 4, 5)),
    ]


def test_pipelined_keeps_window_commands_in_flight_and_answers_in_order() -> None:
    async def scenario() -> tuple[list[int], int]:
        gates = [asyncio.Event() for _ in range(6)]
        in_flight, peak = 0, 0

        async def send(line: str) -> bool:
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            await gates[int(line)].wait()
            in_flight -= 1
            return True

        async def release() -> None:
            for gate in reversed(gates):  # answered out of order: still yielded in order
                await asyncio.sleep(0)
                gate.set()

        releaser = asyncio.create_task(release())
        order = [i async for i, _ in pipelined(send, [str(i) for i in range(6)], window=3)]
        await releaser
        return order, peak

    assert run(scenario) == ([0, 1, 2, 3, 4, 5], 3)


def test_pipelined_sends_the_next_command_before_its_consumer_sees_an_answer() -> None:
    """A slot freed by an answer is refilled before the answer is yielded: ExaBGP naps when a
    pass of its loop reads no new command, so the next command must not wait for the
    consumer's work on the last answer (a batch's routes recorded)."""
    async def scenario() -> list[tuple[int, list[str]]]:
        written: list[str] = []

        async def send(line: str) -> bool:
            written.append(line)  # ExaBGPSpeaker.send writes before its first await
            await asyncio.sleep(0)
            return True

        seen = []
        async for i, _ok in pipelined(send, (str(n) for n in range(5)), window=2):
            seen.append((i, list(written)))
        return seen

    assert run(scenario) == [(0, ["0", "1", "2"]), (1, ["0", "1", "2", "3"]), (2, ["0", "1", "2", "3", "4"]),
                             (3, ["0", "1", "2", "3", "4"]), (4, ["0", "1", "2", "3", "4"])]


def test_send_changes_builds_the_lines_it_sends_and_batches_does() -> None:
    """send_changes spells each command out as it sends it (batch_members, batch_line): the
    same commands, in the same order, as batches."""
    from controller.bgp.exabgp_api import batch_line, batch_members, batches

    changes = [*_changes(7), *(RouteChange(ipaddress.ip_network(f"198.51.100.{i}/32"), None) for i in range(10, 13))]
    assert [batch_line(changes, m) for m in batch_members(changes, 3)] == [b.line for b in batches(changes, 3)]
    assert batch_members(changes, 3) == [b.members for b in batches(changes, 3)]

    async def scenario() -> list[str]:
        h = Harness()
        h.writer = AutoAckWriter(h.reader, "none")
        h.speaker._writer = h.writer
        reader = asyncio.create_task(h.speaker.run_reader())
        async for _ in send_changes(h.speaker.send, changes, max_routes=3, window=2):
            pass
        h.reader.feed_eof()
        await reader
        return h.writer.lines

    assert run(scenario) == [b.line for b in batches(changes, 3)]


def test_a_consumer_that_stops_leaves_no_send_running() -> None:
    async def scenario() -> list[str]:
        started: list[str] = []
        never = asyncio.Event()

        async def send(line: str) -> bool:
            started.append(line)
            await never.wait()
            return True

        consumer = asyncio.create_task(_drain(pipelined(send, [str(i) for i in range(10)], window=4)))
        for _ in range(5):
            await asyncio.sleep(0)
        consumer.cancel()
        await asyncio.gather(consumer, return_exceptions=True)
        pending = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert pending == []
        return started

    assert run(scenario) == ["0", "1", "2", "3"]  # the window, and not one line more


async def _drain(gen: AsyncIterator[tuple[int, bool]]) -> None:
    async for _ in gen:
        pass
