"""BGP values the config validator and the ExaBGP encoder must agree on, parsed in one place.

``controller.config`` (what ``anycastctl validate`` accepts) and ``controller.bgp`` (what
the agent writes to ExaBGP) both call these functions, so a config that validates always
announces: there is no second, stricter parser on the announce path to crash into.

Communities are kept in one canonical, numeric form (``65535:65281``, not ``no-export``):
ExaBGP 5 knows only some well-known names (not RFC 8326's ``graceful-shutdown``), but it
parses every ``ASN:VALUE``; and two spellings of one community compare equal, so the
reconciler never re-announces a route because a name became a number.

MD5 keys are measured in bytes (the kernel's TCP_MD5SIG_MAXKEYLEN is 80 bytes) and must be
printable ASCII: ExaBGP encodes the key with ``bytes(key, 'ascii')`` (a non-ASCII key
crashes it when the session opens), and the router on the other side must be configured
with the very same bytes.
"""

from __future__ import annotations

import ipaddress
from typing import Final

U16_MAX: Final = 0xFFFF
U32_MAX: Final = 0xFFFF_FFFF
MD5_KEY_MAX: Final = 80  # TCP_MD5SIG_MAXKEYLEN in Linux, in bytes

# IANA "BGP Well-known Communities" that an operator may put on an announcement.
WELL_KNOWN_COMMUNITIES: Final[dict[str, tuple[int, int]]] = {
    "graceful-shutdown": (0xFFFF, 0x0000),  # RFC 8326
    "accept-own": (0xFFFF, 0x0001),  # RFC 7611
    "llgr-stale": (0xFFFF, 0x0006),  # RFC 9494
    "no-llgr": (0xFFFF, 0x0007),  # RFC 9494
    "blackhole": (0xFFFF, 0x029A),  # RFC 7999
    "no-export": (0xFFFF, 0xFF01),  # RFC 1997
    "no-advertise": (0xFFFF, 0xFF02),  # RFC 1997
    "no-export-subconfed": (0xFFFF, 0xFF03),  # RFC 1997
    "no-peer": (0xFFFF, 0xFF04),  # RFC 3765
}
GRACEFUL_SHUTDOWN: Final = "65535:0"

# Characters that would end or escape the quoted md5-password in ExaBGP's config, or end
# its statement.
_MD5_FORBIDDEN: Final = frozenset("\"\\';")


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit()


def parse_community(value: object) -> tuple[int, int]:
    """``ASN:VALUE`` (each 0-65535) or a well-known name -> its two 16-bit halves.

    Raises ValueError with a message fit for a config error. A bare number is refused:
    YAML reads an unquoted ``65101:50`` as a base-60 integer, which must not silently
    become some other community.
    """
    if not isinstance(value, str):
        raise ValueError(f"not a BGP community (write it as a quoted string, e.g. \"65101:100\"): {value!r}")
    name = value.strip().lower()
    if name in WELL_KNOWN_COMMUNITIES:
        return WELL_KNOWN_COMMUNITIES[name]
    fields = value.split(":")
    if len(fields) == 2 and all(_digits(f) for f in fields):
        a, b = (int(f) for f in fields)
        if a <= U16_MAX and b <= U16_MAX:
            return a, b
    names = ", ".join(WELL_KNOWN_COMMUNITIES)
    raise ValueError(f"not a BGP community (ASN:VALUE, each 0-65535, or one of {names}): {value!r}")


def parse_large_community(value: object) -> tuple[int, int, int]:
    """``A:B:C`` (each 0-4294967295, RFC 8092) -> its three parts. Raises ValueError."""
    if isinstance(value, str):
        fields = value.split(":")
        if len(fields) == 3 and all(_digits(f) for f in fields):
            a, b, c = (int(f) for f in fields)
            if max(a, b, c) <= U32_MAX:
                return a, b, c
    raise ValueError(f"not a large community (A:B:C, each 0-4294967295): {value!r}")


# Extended communities (RFC 4360) the agent can put on a route: route target and route
# origin, written like ExaBGP writes them (``target:65000:1``, ``origin:192.0.2.1:7``).
EXTENDED_COMMUNITY_TYPES: Final = ("target", "origin")


def parse_extended_community(value: object) -> tuple[str, int | str, int]:
    """``target:ADMIN:VALUE`` or ``origin:ADMIN:VALUE`` -> (type, admin, value). Raises ValueError.

    ADMIN is a 2-byte AS (VALUE then 0-4294967295) or an IPv4 address (VALUE 0-65535). A
    4-byte AS is refused: ExaBGP 5.0 sends it with the IPv4-address type (0x01), so the
    router would read ``target:4200000000:5`` as ``250.86.234.0:5``.
    """
    problem = ValueError(f"not an extended community (target:ASN:VALUE or origin:ASN:VALUE, ASN a 2-byte AS "
                         f"or an IPv4 address): {value!r}")
    if not isinstance(value, str):
        raise problem
    fields = value.split(":")
    if len(fields) != 3 or fields[0].lower() not in EXTENDED_COMMUNITY_TYPES or not _digits(fields[2]):
        raise problem
    kind, admin_text, number = fields[0].lower(), fields[1], int(fields[2])
    if _digits(admin_text):
        admin = int(admin_text)
        if admin > U16_MAX:
            raise ValueError(f"not an extended community: {value!r} has a 4-byte AS, which ExaBGP 5 "
                             "would send as an IPv4 address; use a 2-byte AS or an IPv4 address")
        if number > U32_MAX:
            raise problem
        return kind, admin, number
    try:
        address = ipaddress.IPv4Address(admin_text)
    except ValueError:
        raise problem from None
    if number > U16_MAX:
        raise problem
    return kind, str(address), number


def canonical_extended_communities(values: object) -> tuple[str, ...]:
    """Extended communities as sorted, de-duplicated ``type:admin:value`` strings. Raises."""
    if isinstance(values, str) or not isinstance(values, (tuple, list)):
        raise ValueError(f"expected a list of extended communities, got {values!r}")
    parsed = {parse_extended_community(v) for v in values}
    return tuple(f"{k}:{a}:{n}" for k, a, n in sorted(parsed, key=lambda e: (e[0], str(e[1]), e[2])))


def canonical_communities(values: object) -> tuple[str, ...]:
    """Communities as sorted, de-duplicated ``A:B`` strings (how ExaBGP sends them). Raises."""
    if isinstance(values, str) or not isinstance(values, (tuple, list)):
        # A bare string is a sequence of characters to Python; catch it by name.
        raise ValueError(f"expected a list of communities, got {values!r}")
    return tuple(f"{a}:{b}" for a, b in sorted({parse_community(v) for v in values}))


def canonical_large_communities(values: object) -> tuple[str, ...]:
    """Large communities as sorted, de-duplicated ``A:B:C`` strings. Raises ValueError."""
    if isinstance(values, str) or not isinstance(values, (tuple, list)):
        raise ValueError(f"expected a list of large communities, got {values!r}")
    return tuple(f"{a}:{b}:{c}" for a, b, c in sorted({parse_large_community(v) for v in values}))


def check_md5_password(value: object) -> str:
    """An MD5 key the kernel, ExaBGP's config tokeniser and ExaBGP's encoder all take. Raises."""
    if not isinstance(value, str) or not value:
        raise ValueError("expected a non-empty string")
    if not value.isascii() or not value.isprintable():
        # ExaBGP encodes the key as ASCII; a non-ASCII key would crash it at connect time.
        raise ValueError("must be printable ASCII (ExaBGP sends the key as ASCII bytes)")
    if any(c in _MD5_FORBIDDEN for c in value):
        raise ValueError("must not contain quotes, backslashes or ';'")
    if len(value.encode("ascii")) > MD5_KEY_MAX:
        raise ValueError(f"at most {MD5_KEY_MAX} bytes (the kernel's TCP MD5 key limit), got {len(value)}")
    return value
