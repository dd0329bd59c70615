"""One health-check attempt against one backend: a TCP connect, or an HTTP(S) GET.

A probe never raises for anything the network or the backend does: refused, reset,
unreachable, TLS failures, garbage answers and timeouts all become a failed
``ProbeResult`` whose ``detail`` says why in a few words (it ends up in the log line of a
health transition). The whole attempt, connect and TLS included, is bounded by the spec's
timeout. Hosts are IP literals only: a health check must not depend on DNS, which may be
the very thing that is broken.

The HTTP client is deliberately minimal (one HTTP/1.1 GET with ``Connection: close``,
status line, headers, at most 64 KiB of body, plain or chunked): it is all a health check
needs, and it keeps the agent free of an HTTP library dependency.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import ipaddress
import socket
import ssl
import string
import time
import urllib.parse
from dataclasses import dataclass
from typing import Final

KINDS: Final = ("tcp", "http", "https")
MAX_BODY: Final = 64 * 1024  # enough for any sane health page; bounds memory per probe
MAX_HEAD: Final = 64 * 1024  # status line and headers together
USER_AGENT: Final = "anycast-agent-healthcheck/1"

_DEFAULT_PORT: Final = {"http": 80, "https": 443}
_PRINTABLE_STR: Final = "".join(chr(c) for c in range(0x21, 0x7F))  # visible ASCII, no space
_PRINTABLE: Final = frozenset(_PRINTABLE_STR)
_ERRNO_TEXT: Final = {
    errno.ECONNREFUSED: "connect refused",
    errno.ECONNRESET: "connection reset",
    errno.ECONNABORTED: "connection aborted",
    errno.EPIPE: "connection closed by peer",
    errno.EHOSTUNREACH: "host unreachable",
    errno.ENETUNREACH: "network unreachable",
    errno.ETIMEDOUT: "connect timed out in the kernel",
    errno.EADDRNOTAVAIL: "source address not available",
    errno.EADDRINUSE: "no free local port",
}


@dataclass(frozen=True)
class ProbeSpec:
    """What to check and how. Invalid values raise ValueError at construction."""

    kind: str  # tcp | http | https
    host: str  # an IP literal, never a name
    port: int
    timeout: float  # seconds, for the whole attempt
    path: str = "/"
    expect_status: int = 200
    expect_body: str | None = None  # a substring the first 64 KiB of the body must contain
    host_header: str | None = None  # default: the address and port; also the TLS SNI name
    tls_verify: bool = False  # backbone checks usually hit IPs with self-signed certs
    source: str | None = None  # local address to connect from

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        for name in ("host", "source"):
            value = getattr(self, name)
            if value is None:
                continue
            try:
                ipaddress.ip_address(value)
            except ValueError:
                raise ValueError(f"{name} must be an IP address (health checks do no DNS), got {value!r}") from None
        if not 0 < self.port < 65536:
            raise ValueError(f"port must be 1-65535, got {self.port}")
        if not self.timeout > 0:
            raise ValueError(f"timeout must be positive, got {self.timeout}")
        if not 100 <= self.expect_status <= 599:
            raise ValueError(f"expect_status must be an HTTP status (100-599), got {self.expect_status}")
        if not self.path.startswith("/"):
            raise ValueError(f"path must start with '/', got {self.path!r}")
        if self.host_header:  # "" means none, as in _request
            _wire_host(self.host_header)  # raises ValueError if it cannot go on the wire


@dataclass(frozen=True)
class ProbeResult:
    ok: bool
    latency: float  # seconds from start to verdict, failures included
    detail: str  # short and human: "HTTP 200", "connect refused", "timeout after 0.50s connecting"


class _BadResponse(Exception):
    """The backend answered something that is not an HTTP response we can judge."""


async def probe(spec: ProbeSpec) -> ProbeResult:
    """Run one check. Returns a failed result, never raises, for network and backend trouble."""
    started = time.perf_counter()
    stage = "connecting"  # where a timeout or an error struck, for the detail
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(spec.timeout):
            if spec.kind == "tcp":
                await _tcp_connect(spec)
                ok, detail = True, "connected"
            else:
                reader, writer = await _connect(spec)
                stage = "sending the request"
                writer.write(_request(spec))
                await writer.drain()
                stage = "waiting for the response"
                status, headers = await _read_head(reader)
                if status != spec.expect_status:
                    # No need to read a body we will not judge.
                    ok, detail = False, f"HTTP {status} (expected {spec.expect_status})"
                else:
                    stage = "reading the body"
                    body = await _read_body(reader, status, headers)
                    if spec.expect_body is not None and spec.expect_body.encode() not in body:
                        ok, detail = False, f"body lacks {_shorten(spec.expect_body)!r}"
                    else:
                        ok, detail = True, f"HTTP {status}"
    except TimeoutError:
        ok, detail = False, f"timeout after {spec.timeout:.2f}s {stage}"
    except ssl.SSLCertVerificationError as exc:  # before OSError: SSL errors are OSErrors
        ok, detail = False, f"TLS: {exc.verify_message or exc.reason}"
    except ssl.SSLError as exc:
        # exc.reason is OpenSSL's WRONG_VERSION_NUMBER style; make it read like the rest.
        ok, detail = False, f"TLS: {exc.reason.lower().replace('_', ' ') if exc.reason else exc}"
    except OSError as exc:
        text = _ERRNO_TEXT.get(exc.errno or 0) or exc.strerror or type(exc).__name__
        ok, detail = False, text if stage == "connecting" else f"{text} {stage}"
    except asyncio.IncompleteReadError as exc:
        if stage == "reading the body" and exc.expected is not None:
            ok, detail = False, f"body truncated ({len(exc.partial)} of {exc.expected} bytes)"
        else:
            ok, detail = False, f"connection closed {stage}"
    except (_BadResponse, asyncio.LimitOverrunError) as exc:
        ok, detail = False, f"bad response: {exc}"
    finally:
        if writer is not None:
            # abort, not close: a graceful TLS close waits up to 30 s for the peer's
            # close_notify, and a health check has nothing left to say. Closes the fd now.
            writer.transport.abort()
    return ProbeResult(ok, time.perf_counter() - started, detail)


async def _tcp_connect(spec: ProbeSpec) -> None:
    """Connect, then close. A bare socket costs about a third less CPU than a stream pair,
    which counts at thousands of checks a second."""
    sock = socket.socket(socket.AF_INET6 if ":" in spec.host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        if spec.source:
            sock.bind((spec.source, 0))
        await asyncio.get_running_loop().sock_connect(sock, (spec.host, spec.port))
    finally:
        sock.close()


async def _connect(spec: ProbeSpec) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    tls: ssl.SSLContext | None = None
    server_hostname: str | None = None
    if spec.kind == "https":
        tls = _tls_context(spec.tls_verify)
        # SNI and certificate name: the virtual host when one is given, else the address
        # (matched against the certificate's IP SANs when verifying).
        server_hostname = _hostname_of(spec.host_header) if spec.host_header else spec.host
    return await asyncio.open_connection(
        spec.host, spec.port, ssl=tls, server_hostname=server_hostname,
        local_addr=(spec.source, 0) if spec.source else None,
    )


@functools.cache
def _tls_context(verify: bool) -> ssl.SSLContext:
    """One context per mode for the whole process: building one loads the CA store (ms)."""
    if verify:
        return ssl.create_default_context()
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _request(spec: ProbeSpec) -> bytes:
    host = _wire_host(spec.host_header) if spec.host_header else _authority(spec)
    return (
        f"GET {_wire_path(spec.path)} HTTP/1.1\r\n"
        f"Host: {host}\r\n"
        f"User-Agent: {USER_AGENT}\r\n"
        "Accept: */*\r\n"
        "Connection: close\r\n"
        "\r\n"
    ).encode("ascii")


def _authority(spec: ProbeSpec) -> str:
    address = ipaddress.ip_address(spec.host)
    host = f"[{address}]" if address.version == 6 else str(address)
    return host if spec.port == _DEFAULT_PORT[spec.kind] else f"{host}:{spec.port}"


def _hostname_of(host_header: str) -> str:
    """'example.com:8443' -> 'example.com', '[2001:db8::1]:443' -> '2001:db8::1'."""
    if host_header.startswith("["):
        return host_header[1:].partition("]")[0]
    name, colon, port = host_header.rpartition(":")
    return name if colon and port.isdigit() else host_header


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    """Status code and headers (names lowercased) of the final response; 1xx are skipped."""
    size = 0
    while True:
        line = await reader.readuntil(b"\n")
        size += len(line)
        version, _, rest = line.decode("latin-1").rstrip("\r\n").partition(" ")
        code = rest[:3]
        if not version.startswith("HTTP/") or not _is_number(code, 10) or rest[3:4] not in ("", " "):
            raise _BadResponse(f"not an HTTP status line: {_shorten(line.decode('latin-1').strip())!r}")
        headers: dict[str, str] = {}
        while True:
            line = await reader.readuntil(b"\n")
            size += len(line)
            if size > MAX_HEAD:
                raise _BadResponse(f"headers longer than {MAX_HEAD} bytes")
            if line in (b"\r\n", b"\n"):
                break
            name, colon, value = line.decode("latin-1").partition(":")
            if not colon:
                raise _BadResponse(f"malformed header line: {_shorten(line.decode('latin-1').strip())!r}")
            headers[name.strip().lower()] = value.strip()
        status = int(code)
        # 100 Continue, 103 Early Hints: an interim answer, the real one follows.
        if not (100 <= status < 200) or status == 101:
            return status, headers


async def _read_body(reader: asyncio.StreamReader, status: int, headers: dict[str, str]) -> bytes:
    """Up to MAX_BODY bytes of the body, framed by chunked encoding, Content-Length or EOF."""
    if status in (204, 304):
        return b""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _read_chunked(reader)
    length = headers.get("content-length")
    if length is not None:
        if not _is_number(length, 10):
            raise _BadResponse(f"bad Content-Length {_shorten(length)!r}")
        # Stop at Content-Length: a server that ignores "Connection: close" must not
        # turn a good answer into a timeout.
        return await reader.readexactly(min(int(length), MAX_BODY))
    body = bytearray()
    while len(body) < MAX_BODY:
        chunk = await reader.read(MAX_BODY - len(body))
        if not chunk:
            break
        body += chunk
    return bytes(body)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while len(body) < MAX_BODY:
        size_line = await reader.readuntil(b"\n")
        size_text = size_line.split(b";", 1)[0].strip().decode("latin-1")
        if not _is_number(size_text, 16):
            raise _BadResponse(f"bad chunk size {_shorten(size_text)!r}")
        size = int(size_text, 16)
        if size == 0:
            break  # trailers, if any, are left unread: the connection closes anyway
        take = min(size, MAX_BODY - len(body))
        body += await reader.readexactly(take)
        if take < size:
            break
        await reader.readexactly(2)  # CRLF after the chunk data
    return bytes(body)


def _is_number(text: str, base: int) -> bool:
    """Plain digits only: int() would also take '+5', '1_000' and non-ASCII digits."""
    digits = string.digits if base == 10 else string.hexdigits
    return bool(text) and all(c in digits for c in text)


def _wire_path(path: str) -> str:
    """Percent-encode what may not appear raw in a request line (spaces, non-ASCII)."""
    return path if _PRINTABLE.issuperset(path) else urllib.parse.quote(path, safe=_PRINTABLE_STR)


def _wire_host(host_header: str) -> str:
    """The Host header as sent: IDNA for non-ASCII names; whitespace could split the request."""
    if not host_header or not all(c.isprintable() and not c.isspace() for c in host_header):
        raise ValueError(f"host_header must be a non-empty name without spaces or control characters, "
                         f"got {host_header!r}")
    return host_header if host_header.isascii() else host_header.encode("idna").decode("ascii")


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
