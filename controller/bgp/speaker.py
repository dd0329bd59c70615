"""The I/O shell around ExaBGP's process API: write commands, match acks, dispatch events.

ExaBGP answers commands in order and without identifiers, so the speaker keeps a FIFO of
futures, one per command written and not yet answered. Appending the future and writing
the line happen with no await in between, so concurrent `send` calls stay in step with
the ack stream. Once an ack is lost (timeout) the FIFO can no longer be trusted, so the
speaker closes: the agent should exit and let ExaBGP respawn it (ExaBGP keeps the routes
it announced; the new agent reconciles them).

`send_changes` pipelines route changes: alike changes share one command (``announce
attributes ... nlri P1 P2 ...``, `exabgp_api.batches`), several commands are in flight at
once, and a command ExaBGP refuses is resent route by route so the error is reported
against the route that caused it. Measured in ``bench/announce_rate.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sys
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from typing import Final, Protocol

from controller.bgp.exabgp_api import (
    MAX_BATCH, Ack, Event, Garbage, RouteChange, batch_line, batch_members, parse_line,
)

logger = logging.getLogger("controller.bgp")

# asyncio's default 64 KiB line limit is too small for a JSON UPDATE carrying a large
# (extended-length) BGP message.
_LINE_LIMIT = 4 * 1024 * 1024
# Commands written ahead of their acks (16 x 50 routes): enough queued that ExaBGP never waits
# for us, few enough that a stop cuts little short (bench/announce_rate.py).
PIPELINE_WINDOW: Final = 16


class SpeakerClosed(Exception):
    """ExaBGP went away (EOF on stdin) or the ack stream was lost; no more commands."""


class CommandWriter(Protocol):
    """What the speaker needs from its output stream (an `asyncio.StreamWriter` fits)."""

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...


class ExaBGPSpeaker:
    """Sends commands to ExaBGP and reads its answers and messages."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: CommandWriter,
        *,
        on_event: Callable[[Event], None],
        ack: bool = True,
        ack_timeout: float = 10.0,
        on_line: Callable[[str], None] | None = None,
    ) -> None:
        """`ack` must match ExaBGP's ``exabgp.api.ack``; `on_line` sees every raw line read."""
        self._reader = reader
        self._writer = writer
        self._on_event = on_event
        self._ack = ack
        self._ack_timeout = ack_timeout
        self._on_line = on_line
        self._pending: deque[asyncio.Future[bool]] = deque()
        self._closed_reason: str | None = None

    @classmethod
    async def connect_stdio(
        cls,
        *,
        on_event: Callable[[Event], None],
        ack: bool = True,
        ack_timeout: float = 10.0,
        on_line: Callable[[str], None] | None = None,
    ) -> ExaBGPSpeaker:
        """Take over stdin/stdout (the pipes from ExaBGP) for the protocol.

        The pipes are moved to private descriptors and fds 0/1 are pointed at /dev/null
        and stderr: a stray print() or a child process inheriting stdout would otherwise
        inject a command, and its extra ack would shift every later ack onto the wrong
        command.
        """
        loop = asyncio.get_running_loop()
        sys.stdout.flush()
        protocol_in = os.fdopen(os.dup(sys.stdin.fileno()), "rb", buffering=0)
        protocol_out = os.fdopen(os.dup(sys.stdout.fileno()), "wb", buffering=0)
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, sys.stdin.fileno())
        os.close(devnull)
        os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

        reader = asyncio.StreamReader(limit=_LINE_LIMIT)
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), protocol_in)
        transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, protocol_out)
        writer = asyncio.StreamWriter(transport, protocol, None, loop)
        return cls(reader, writer, on_event=on_event, ack=ack, ack_timeout=ack_timeout, on_line=on_line)

    @property
    def closed(self) -> bool:
        """True once no more commands can be sent."""
        return self._closed_reason is not None

    async def send(self, line: str) -> bool:
        """Write one command; return True for ``done``, False for ``error``.

        Without acks, return True once the line is written. Raises `SpeakerClosed` if
        ExaBGP has gone away or the ack did not come within `ack_timeout`.
        """
        if "\n" in line or "\r" in line:
            # Two commands in one send would get two acks for one future.
            raise ValueError(f"one command per send, got {line!r}")
        if self._closed_reason is not None:
            raise SpeakerClosed(self._closed_reason)
        future: asyncio.Future[bool] | None = None
        if self._ack:
            future = asyncio.get_running_loop().create_future()
            future.add_done_callback(_consume_exception)
            self._pending.append(future)
        try:
            self._writer.write(line.encode() + b"\n")
            await self._writer.drain()
        except (ConnectionError, OSError) as exc:
            self._close(f"writing to ExaBGP failed: {exc!r}")
            raise SpeakerClosed(self._closed_reason) from exc
        if future is None:
            return True
        try:
            async with asyncio.timeout(self._ack_timeout):
                # shield: a timeout must not cancel the future, _close fails it instead.
                return await asyncio.shield(future)
        except TimeoutError:
            self._close(f"no ack from ExaBGP within {self._ack_timeout}s for {line!r}")
            raise SpeakerClosed(self._closed_reason) from None

    async def run_reader(self) -> None:
        """Read ExaBGP's lines until EOF: resolve acks, dispatch events, skip garbage.

        Exceptions raised by `on_event` propagate (after pending commands are failed),
        so a bug in the handler stops the agent instead of being silently lost.
        """
        reason = "ExaBGP closed the API pipe (EOF)"
        try:
            while True:
                try:
                    raw = await self._reader.readline()
                except ValueError as exc:
                    # Line longer than the limit: asyncio has dropped it; keep reading.
                    logger.warning("skipping an over-long line from ExaBGP: %s", exc)
                    continue
                if not raw:
                    return
                line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
                if self._on_line is not None:
                    self._on_line(line)
                self._dispatch(parse_line(line))
        except BaseException as exc:
            reason = f"the ExaBGP reader stopped: {exc!r}"
            raise
        finally:
            self._close(reason)

    def _dispatch(self, event: Event) -> None:
        if isinstance(event, Ack):
            self._resolve(event.ok)
        else:
            if isinstance(event, Garbage):
                logger.warning("ignoring a line from ExaBGP: %s: %r", event.error, event.raw)
            # Garbage too, so the agent can count it (anycast_exabgp_unparsed_lines_total).
            self._on_event(event)

    def _resolve(self, ok: bool) -> None:
        if not self._pending:
            # With ack off on our side but on in ExaBGP this is expected; otherwise it
            # means something else wrote commands on our stdout.
            log = logger.debug if not self._ack else logger.warning
            log("ack %r from ExaBGP with no command waiting for it", "done" if ok else "error")
            return
        future = self._pending.popleft()
        if not future.done():
            future.set_result(ok)

    def _close(self, reason: str) -> None:
        if self._closed_reason is None:
            self._closed_reason = reason
            logger.info("ExaBGP speaker closed: %s", reason)
        while self._pending:
            future = self._pending.popleft()
            if not future.done():
                future.set_exception(SpeakerClosed(reason))


def _consume_exception(future: asyncio.Future[bool]) -> None:
    # A future failed after its sender stopped waiting (timeout, cancellation) would make
    # asyncio log "exception was never retrieved"; the sender already got its answer.
    if not future.cancelled():
        future.exception()


Send = Callable[[str], Awaitable[bool]]


async def pipelined(send: Send, lines: Iterable[str], window: int = PIPELINE_WINDOW) -> AsyncIterator[tuple[int, bool]]:
    """Send `lines` with up to `window` of them awaiting their ack; yield (index, ok) in order.

    `lines` may be a generator: each line is taken only when it is sent.

    Each send is its own task, started in order: `ExaBGPSpeaker.send` writes its line before
    its first await, so the lines reach ExaBGP in order and the ack FIFO stays in step. If
    the consumer stops (or is cancelled), the sends not yet started never are; those in
    flight are cancelled (their acks are still matched by the speaker).
    """
    if window < 1:
        raise ValueError(f"window: {window} is not at least 1")
    in_flight: deque[asyncio.Future[bool]] = deque()
    answered = 0
    pending = iter(lines)
    try:
        for line in itertools.islice(pending, window):
            in_flight.append(asyncio.ensure_future(send(line)))
        while in_flight:
            ok = await in_flight[0]  # popped once answered: a cancel here reaches it below
            in_flight.popleft()
            # The next command leaves before the consumer handles this answer: ExaBGP naps
            # (up to 10 ms, `reactor.speed`) when a pass of its loop reads no new command,
            # and the consumer's work per answer (a batch's routes recorded) was that wait.
            following = next(pending, None)
            if following is not None:
                in_flight.append(asyncio.ensure_future(send(following)))
                await asyncio.sleep(0)  # the send's first step writes the line
            yield answered, ok
            answered += 1
    finally:
        for task in in_flight:
            task.cancel()
        if in_flight:
            await asyncio.gather(*in_flight, return_exceptions=True)


async def send_changes(
    send: Send, changes: Sequence[RouteChange], *, max_routes: int = MAX_BATCH, window: int = PIPELINE_WINDOW,
) -> AsyncIterator[tuple[tuple[int, ...], bool]]:
    """Send `changes` batched and pipelined; yield (indexes into `changes`, ok) as ExaBGP answers.

    Every change is answered exactly once. A batch answered ``error`` is not reported: its
    changes are resent one command each (announce and withdraw are idempotent in ExaBGP),
    and each is reported with its own answer, so one bad route fails alone.
    """
    sent = batch_members(changes, max_routes)
    refused: list[tuple[int, ...]] = []
    # Each line built as it is sent: the first command leaves before the last is spelled out.
    async for i, ok in pipelined(send, (batch_line(changes, members) for members in sent), window):
        members = sent[i]
        if ok or len(members) == 1:
            yield members, ok
        else:
            refused.append(members)
    if refused:
        logger.warning("ExaBGP refused %d batch command(s); resending their %d route(s) one by one", len(refused),
                       sum(len(m) for m in refused))
    singles = [m for members in refused for m in members]
    async for i, ok in pipelined(send, [changes[m].line() for m in singles], window):
        yield (singles[i],), ok
