"""A CLB backend for the lab: a tiny HTTP server that says which origin served the request.

    python -m lab.backend --listen 100.64.10.1:8080 --origin us-west [--listen ...]

``GET /healthz`` answers ``ok``; any other path answers ``served-by origin=NAME
backend=ADDR:PORT``. Requests to a VIP that the origin holds on its loopback are answered
the same way (listen on 0.0.0.0). No DNS anywhere (lookups stall inside namespaces).
"""

from __future__ import annotations

import argparse
import asyncio
import signal


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, origin: str, me: str) -> None:
    try:
        while True:
            request = await reader.readuntil(b"\r\n\r\n")
            line = request.split(b"\r\n", 1)[0].decode("latin-1")
            parts = line.split()
            path = parts[1] if len(parts) >= 2 else "/"
            peer = writer.get_extra_info("peername")
            peer_ip = peer[0] if peer else "?"
            # peer: who connected. In the lab the POP's agent host NATs client traffic to its
            # backbone address, so this names the POP the request entered.
            body = b"ok\n" if path == "/healthz" else f"served-by origin={origin} backend={me} peer={peer_ip}\n".encode()
            keep = b"connection: close" not in request.lower()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: "
                + str(len(body)).encode() + b"\r\n" + (b"" if keep else b"Connection: close\r\n") + b"\r\n" + body
            )
            await writer.drain()
            if not keep:
                break
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def serve(listens: list[str], origin: str) -> None:
    servers = []
    for listen in listens:
        host, _, port = listen.rpartition(":")
        me = listen

        async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, me: str = me) -> None:
            await _handle(r, w, origin, me)

        servers.append(await asyncio.start_server(handler, host.strip("[]"), int(port), reuse_address=True))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"backend origin={origin} listening on {', '.join(listens)}", flush=True)
    await stop.wait()
    for s in servers:
        s.close()


def main() -> None:
    p = argparse.ArgumentParser(description="lab CLB backend")
    p.add_argument("--listen", action="append", required=True, help="ADDRESS:PORT (repeatable)")
    p.add_argument("--origin", required=True)
    args = p.parse_args()
    asyncio.run(serve(args.listen, args.origin))


if __name__ == "__main__":
    main()
