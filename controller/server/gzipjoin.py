"""One gzip member made of pieces deflated apart: the full plans' bodies (plans.py).

A POP's full plan is its head, then its entries in runs, then a tail. Most runs are the same
at every POP (a VIP healthy everywhere has one entry, shared by all of them), so each run is
deflated once, for every POP whose plan holds it, and a POP's body is its own head and tail
around pointers to those shared pieces: 300 POPs' plans of 100,000 VIPs were 300 x 82 MB of
JSON gzipped one by one (171 CPU s, 1.97 GB kept), and are now about one plan's worth.

How the pieces join (RFC 1951/1952): each piece is a raw deflate stream of its own
compressor, ended by a sync flush (an empty stored block: the stream ends on a byte
boundary, with no block marked final), so pieces may follow one another; back references
never reach before a piece's start (a fresh compressor has no history). The last piece is
finished (its last block is final). The member's header is fixed and its trailer is the
CRC-32 and length of the whole JSON, combined from the pieces' own (``crc32_combine``, as
zlib's, which Python's zlib does not offer). The result is one ordinary gzip member: any
client reads it (aiohttp, curl, ``gzip.decompress``), and the JSON is byte for byte what
one compressor would have been given.
"""

from __future__ import annotations

import struct
import zlib

LEVEL = 1  # gzip level 1: 4x faster than 6, 15 % larger
HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"  # gzip, deflate, no flags, no mtime, OS unknown
_POLY = 0xEDB88320  # CRC-32's polynomial, reflected


def _multmodp(a: int, b: int) -> int:
    """a(x) b(x) modulo the CRC polynomial (both reflected, as zlib's multmodp)."""
    m, p = 1 << 31, 0
    while a:
        if a & m:
            p ^= b
            a ^= m
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return p


def _powers() -> list[int]:
    table = [1 << 30]  # x^1
    for _ in range(31):
        table.append(_multmodp(table[-1], table[-1]))
    return table


_X2N = _powers()  # x^(2^k) modulo the polynomial


def crc_shift(length: int) -> int:
    """x^(8 length) modulo the polynomial: what ``crc32_combine`` multiplies the CRC of what
    comes before ``length`` bytes by (computed once per piece)."""
    p, k = 1 << 31, 3
    while length:
        if length & 1:
            p = _multmodp(_X2N[k & 31], p)
        length >>= 1
        k += 1
    return p


def crc32_combine(crc1: int, crc2: int, shift2: int) -> int:
    """The CRC-32 of A + B from A's, B's and ``crc_shift(len(B))``."""
    return _multmodp(shift2, crc1) ^ crc2


class Piece:
    """A run of bytes deflated on its own, with its CRC-32, length and shift."""

    __slots__ = ("data", "crc", "size", "shift", "__weakref__")

    def __init__(self, raw: bytes, final: bool = False) -> None:
        packer = zlib.compressobj(LEVEL, zlib.DEFLATED, -15)
        self.data = packer.compress(raw) + packer.flush(zlib.Z_FINISH if final else zlib.Z_SYNC_FLUSH)
        self.crc = zlib.crc32(raw)
        self.size = len(raw)
        self.shift = crc_shift(len(raw))


def member(pieces: list[Piece]) -> tuple[bytes, ...]:
    """One gzip member of ``pieces`` in order (the last one final), as the bytes objects to
    send one after the other: the header, each piece's, the trailer."""
    assert pieces, "a member needs a final piece"
    crc, size = 0, 0
    for p in pieces:
        crc = crc32_combine(crc, p.crc, p.shift)
        size += p.size
    return (HEADER, *(p.data for p in pieces), struct.pack("<II", crc, size & 0xFFFFFFFF))
