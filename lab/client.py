"""A lab client: real HTTP requests to a VIP in a loop, one JSON line per request.

    python -m lab.client --vip 198.51.100.10 --out FILE [--interval 0.02] [--timeout 0.5] [--duration 600]

Each line: {"t": unix time sent, "ok": bool, "ms": latency, "origin": ..., "peer": ...}.
``peer`` is the address the origin saw the request come from: the ingress POP's agent host
(it NATs). Bounded: it stops after --duration seconds or on SIGTERM. No DNS anywhere.
"""

from __future__ import annotations

import argparse
import json
import re
import signal
import socket
import time

_ANSWER = re.compile(rb"served-by origin=(\S+) backend=(\S+) peer=(\S+)")


def request(vip: str, timeout: float) -> dict[str, object]:
    started = time.time()
    line: dict[str, object] = {"t": started, "ok": False}
    try:
        with socket.create_connection((vip, 80), timeout=timeout) as s:
            s.settimeout(timeout)
            s.sendall(f"GET / HTTP/1.1\r\nHost: {vip}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        m = _ANSWER.search(data)
        if data.startswith(b"HTTP/1.1 200") and m:
            line.update(ok=True, origin=m.group(1).decode(), peer=m.group(3).decode())
        else:
            line["error"] = "bad answer"
    except OSError as exc:
        line["error"] = type(exc).__name__
    line["ms"] = round((time.time() - started) * 1000, 1)
    return line


def main() -> None:
    p = argparse.ArgumentParser(description="lab client: HTTP to a VIP in a loop")
    p.add_argument("--vip", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--interval", type=float, default=0.02)
    p.add_argument("--timeout", type=float, default=0.5)
    p.add_argument("--duration", type=float, default=600.0)
    args = p.parse_args()
    stop = False

    def on_term(*_: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    end = time.monotonic() + args.duration
    with open(args.out, "a", buffering=1, encoding="utf-8") as out:
        while not stop and time.monotonic() < end:
            started = time.monotonic()
            out.write(json.dumps(request(args.vip, args.timeout)) + "\n")
            time.sleep(max(0.0, args.interval - (time.monotonic() - started)))


if __name__ == "__main__":
    main()
