"""Large reports are parsed on the event loop in slices (app._parsed), not in a thread that
would take the GIL from the loop at each of its system calls (results 3q, 3t): the same
reports and refusals as a whole parse, other requests answered between the slices, large
reports one at a time in the order they came. Ordering assertions only."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import pytest

from controller import wire
from controller.server import app, core
from controller.wire import WireError, WireReport, decode_report, decode_report_steps

VIPS = 3000  # a body of ~200 KB: over app.SLICED_REPORT_BYTES
REGIONS = frozenset({"us-west", "eu-central"})
PUBLISHED = {f"v{i:04d}": REGIONS for i in range(VIPS)}


def _body(down: int = 7, **extra: Any) -> dict[str, Any]:
    return {"plan_generation": 3, "seq": 11,
            "origins": {f"v{i:04d}": {"us-west": i % down != 0, "eu-central": None if i % 5 == 0 else True}
                        for i in range(VIPS)},
            "announced": {f"v{i:04d}": i % 3 != 0 for i in range(VIPS)}, **extra}


def _raw(body: dict[str, Any]) -> bytes:
    raw = json.dumps(body).encode()
    assert len(raw) >= app.SLICED_REPORT_BYTES
    return raw


def _steps(body: Any, budget_s: float | None) -> tuple[int, WireReport]:
    steps = decode_report_steps(body, PUBLISHED, budget_s)
    slices = 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return slices, done.value
        slices += 1


def test_a_report_decoded_in_slices_is_the_report_decoded_whole() -> None:
    body = _body(checks={"v0007": {"us-west": {"ok": None, "failing": 3.5}}})
    slices, report = _steps(body, 0.0)  # a slice is one look at the clock: 64 VIPs
    assert slices == VIPS // wire._VIPS_PER_CLOCK + 1  # (+ the announced flags, a slice of their own)
    assert report == decode_report(body, PUBLISHED)
    assert _steps(body, None) == (0, report)


@pytest.mark.parametrize("bad, field", [
    ({"origins": {"v2999": {"us-west": 1}}}, "origins.v2999.us-west"),
    ({"origins": {"v2999": {"ap-south": True}}}, "origins.v2999.ap-south"),
    ({"origins": {"nope": {"us-west": True}}}, "origins.nope"),
    ({"announced": {"v0001": "yes"}}, "announced.v0001"),
])
def test_a_bad_report_is_refused_alike_in_slices(bad: dict[str, Any], field: str) -> None:
    body = _body()
    for key, value in bad.items():
        body[key] = {**body[key], **value}
    with pytest.raises(WireError) as whole:
        decode_report(body, PUBLISHED)
    with pytest.raises(WireError) as sliced:
        _steps(body, 0.0)
    assert (sliced.value.field, sliced.value.message) == (whole.value.field, whole.value.message) \
        and whole.value.field == field
    raw = json.dumps(body).encode()
    assert asyncio.run(app._parsed(raw, PUBLISHED, asyncio.Lock())) == app._parse_report(raw, PUBLISHED)


def test_malformed_json_is_refused_alike() -> None:
    raw = b'{"origins": ' + b"[" * 100_000 + b" " * app.SLICED_REPORT_BYTES
    parsed = asyncio.run(app._parsed(raw, PUBLISHED, asyncio.Lock()))
    assert parsed == app._parse_report(raw, PUBLISHED) and parsed[:1] == (400,) and parsed[2] == "body"


def test_large_reports_are_parsed_on_the_loop_one_at_a_time_with_other_requests_between_slices(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(core, "SLICE_S", 0.0)  # a slice is 64 VIPs whatever the machine's speed
    threads: set[str] = set()
    parsing: list[str] = []  # the task each name was validated in, once per run of them
    original = wire.intern

    def watched(name: str) -> str:
        threads.add(threading.current_thread().name)
        task = asyncio.current_task()
        if task is not None and (not parsing or parsing[-1] != task.get_name()):
            parsing.append(task.get_name())
        return original(name)

    monkeypatch.setattr(wire, "intern", watched)
    events: list[str] = []
    first, second = _raw(_body()), _raw(_body(down=3))

    async def scenario() -> None:
        turn = asyncio.Lock()

        async def large(name: str, raw: bytes) -> WireReport | tuple[int, str, str]:
            events.append(f"{name} received")
            parsed = await app._parsed(raw, PUBLISHED, turn)
            events.append(f"{name} parsed")
            return parsed

        async def small() -> None:  # another POP's empty delta, and a status read, meanwhile
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            events.append("small report " + type(app._parse_report(b'{"seq": 12, "base": 11}', PUBLISHED)).__name__)
            await asyncio.sleep(0)
            events.append("status answered")

        a, b, _ = await asyncio.gather(asyncio.create_task(large("first", first), name="first"),
                                       asyncio.create_task(large("second", second), name="second"), small())
        assert parsing == ["first", "second"]  # one whole, then the other: not interleaved
        assert a == decode_report(json.loads(first), PUBLISHED)
        assert b == decode_report(json.loads(second), PUBLISHED)

    asyncio.run(scenario())
    assert threads == {threading.current_thread().name}  # the loop's own thread, no other
    assert events == ["first received", "second received", "small report WireReport", "status answered",
                      "first parsed", "second parsed"]
