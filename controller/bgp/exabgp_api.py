"""ExaBGP 5 process API: the commands the agent writes and the messages it reads.

Pure: no I/O. `controller.bgp.speaker` moves these lines over the pipes.

Theory of operation
-------------------
ExaBGP runs the agent as its API process. The agent writes one command per line on
stdout; with ``exabgp.api.ack=true`` ExaBGP answers every command with a plain-text
``done`` or ``error`` line on the agent's stdin, in command order. Interleaved with the
acks, ExaBGP writes one JSON object per line (``encoder json``): neighbour state changes,
received UPDATEs, and a shutdown notification when it is stopping.

What ExaBGP 5.0.15 really does (read in its source, confirmed against FRR 8.4):

- ``announce route P next-hop self ...``: ``next-hop`` must come first and is mandatory
  for IPv4 unicast (without it the command is answered ``error``).
- ``next-hop self`` resolves to the session's local address, so it only works for a
  prefix of the session's own family. An IPv6 route with ``next-hop self`` sent to a
  neighbour whose IPv4 session carries ``ipv6 unicast`` makes ExaBGP answer ``error``
  and announce the route to *no* neighbour. Give IPv6 VIPs an IPv6 session (see
  `exabgp_config.NeighborSpec.families`).
- An explicit ``as-path`` replaces ExaBGP's own AS instead of being prepended to it:
  to prepend the local AS once, list it twice.
- ``withdraw route P`` needs no next-hop (ExaBGP indexes routes by prefix alone), and a
  withdraw of a prefix that was never announced is still answered ``done``.
- ``done`` means "parsed and queued", not "on the wire": commands sent while the session
  is down are queued and sent when it comes up.
- Communities are sorted by ExaBGP on the wire, so `RouteAttributes` stores them sorted.
"""

from __future__ import annotations

import functools
import ipaddress
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

from .. import bgp_values

Prefix = ipaddress.IPv4Network | ipaddress.IPv6Network

_U32_MAX: Final = 0xFFFF_FFFF
# One AS_SEQUENCE segment holds at most 255 ASNs; the local AS plus its copies must fit.
_MAX_PREPEND: Final = 254


# --------------------------------------------------------------------------- commands


@dataclass(frozen=True)
class RouteAttributes:
    """The BGP path attributes the agent puts on a VIP announcement.

    `as_path_prepend` is how many *extra* copies of `local_as` to send (eBGP). Communities
    are normalised (sorted numerically, duplicates dropped) so two attribute sets that
    put the same route on the wire compare equal.
    """

    med: int | None = None
    as_path_prepend: int = 0
    local_as: int | None = None
    communities: tuple[str, ...] = ()
    large_communities: tuple[str, ...] = ()
    next_hop: str = "self"
    extended_communities: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.med is not None and not 0 <= self.med <= _U32_MAX:
            raise ValueError(f"med: {self.med} is not a 32-bit unsigned number")
        if not 0 <= self.as_path_prepend <= _MAX_PREPEND:
            raise ValueError(f"as_path_prepend: {self.as_path_prepend} is not in 0..{_MAX_PREPEND}")
        if self.local_as is not None and not 1 <= self.local_as <= _U32_MAX:
            raise ValueError(f"local_as: {self.local_as} is not a valid AS number")
        if self.as_path_prepend and self.local_as is None:
            raise ValueError("local_as: needed to prepend the AS path")
        if self.next_hop != "self":
            try:
                ipaddress.ip_address(self.next_hop)
            except ValueError:
                raise ValueError(f"next_hop: {self.next_hop!r} is neither 'self' nor an IP address") from None
        # object.__setattr__ because the dataclass is frozen; normalising here keeps
        # equality meaningful for the reconciler, which diffs attribute sets.
        # The config validator parses with the same functions (bgp_values), so every
        # community a config accepts (well-known names included) is accepted here.
        object.__setattr__(self, "communities", _canonical("communities", bgp_values.canonical_communities,
                                                           self.communities))
        object.__setattr__(self, "large_communities", _canonical(
            "large_communities", bgp_values.canonical_large_communities, self.large_communities))
        object.__setattr__(self, "extended_communities", _canonical(
            "extended_communities", bgp_values.canonical_extended_communities, self.extended_communities))


def _canonical(name: str, parse: Callable[[object], tuple[str, ...]], values: object) -> tuple[str, ...]:
    try:
        return parse(values)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None


def _selector(neighbors: Sequence[str]) -> str:
    """ExaBGP's neighbour selector (``neighbor A , neighbor B ``): the command goes to those
    sessions only. Empty: to every neighbour."""
    if isinstance(neighbors, str):
        raise ValueError(f"neighbors: expected a sequence of addresses, got the string {neighbors!r}")
    if not neighbors:
        return ""
    # The agent passes the same tuple for every VIP of a family: parsed once, not once per
    # route (half of announce_line's cost on a cold start's 10,000 lines).
    return _selector_text(tuple(neighbors))


@functools.lru_cache(maxsize=64)
def _selector_text(neighbors: tuple[str, ...]) -> str:
    return "".join(f"neighbor {ipaddress.ip_address(n)} , " for n in neighbors)[:-2]


def announce_line(prefix: Prefix, attrs: RouteAttributes, neighbors: Sequence[str] = ()) -> str:
    """The ExaBGP command that announces `prefix` with `attrs` to `neighbors` (default: all)."""
    _check_next_hop(prefix.version, attrs, str(prefix))
    return f"{_selector(neighbors)}announce route {prefix} {_attribute_text(attrs)}"


def _check_next_hop(version: int, attrs: RouteAttributes, what: str) -> None:
    if attrs.next_hop != "self" and ipaddress.ip_address(attrs.next_hop).version != version:
        # ExaBGP would turn an IPv4 next hop for an IPv6 prefix into ::ffff:a.b.c.d; FRR
        # marks that path valid but never installs it in the kernel. Refuse instead.
        raise ValueError(f"next_hop: {attrs.next_hop} is not of the same family as {what}")


@functools.lru_cache(maxsize=1024)
def _attribute_text(attrs: RouteAttributes) -> str:
    """``next-hop ... med ... as-path [...] community [...]``: what follows the prefix of an
    ``announce route`` and the ``attributes`` keyword of a batch (memoised: 10,000 VIPs share
    a handful of attribute sets)."""
    parts = [f"next-hop {attrs.next_hop}"]
    if attrs.med is not None:
        parts.append(f"med {attrs.med}")
    if attrs.as_path_prepend:
        # The explicit as-path replaces ExaBGP's own AS: one copy for the AS itself,
        # plus one per prepend.
        path = " ".join([str(attrs.local_as)] * (attrs.as_path_prepend + 1))
        parts.append(f"as-path [ {path} ]")
    if attrs.communities:
        parts.append(f"community [ {' '.join(attrs.communities)} ]")
    if attrs.large_communities:
        parts.append(f"large-community [ {' '.join(attrs.large_communities)} ]")
    if attrs.extended_communities:
        parts.append(f"extended-community [ {' '.join(attrs.extended_communities)} ]")
    return " ".join(parts)


def announce_batch_line(prefixes: Sequence[Prefix], attrs: RouteAttributes, neighbors: Sequence[str] = ()) -> str:
    """One command announcing every prefix of `prefixes` (one family) with the same `attrs`:
    ``announce attributes ... nlri P1 P2 ...``. ExaBGP parses the whole line before it
    queues any route, so ``error`` means none of them was taken (see `batches`)."""
    version = _one_family(prefixes)
    _check_next_hop(version, attrs, f"IPv{version}")
    return (f"{_selector(neighbors)}announce attributes {_attribute_text(attrs)} nlri "
            + " ".join(str(p) for p in prefixes))


def withdraw_batch_line(prefixes: Sequence[Prefix], neighbors: Sequence[str] = ()) -> str:
    """One command withdrawing every prefix of `prefixes` (one family). ExaBGP's ``withdraw
    attributes`` wants a next hop to parse; it indexes routes by prefix, so ``self`` matches
    whatever next hop they were announced with."""
    _one_family(prefixes)
    return f"{_selector(neighbors)}withdraw attributes next-hop self nlri " + " ".join(str(p) for p in prefixes)


def _one_family(prefixes: Sequence[Prefix]) -> int:
    versions = {p.version for p in prefixes}
    if len(versions) != 1:
        raise ValueError(f"a batch holds prefixes of exactly one family, got {sorted(versions) or 'none'}")
    return versions.pop()


# --------------------------------------------------------------------------- batches


@dataclass(frozen=True)
class RouteChange:
    """One route to announce (`attrs` set) or withdraw (`attrs` None), toward `neighbors`."""

    prefix: Prefix
    attrs: RouteAttributes | None
    neighbors: tuple[str, ...] = ()

    def line(self) -> str:
        """This change alone, as one command."""
        if self.attrs is None:
            return withdraw_line(self.prefix, self.neighbors)
        return announce_line(self.prefix, self.attrs, self.neighbors)


@dataclass(frozen=True)
class Batch:
    """One command and the changes it carries (indexes into the list given to `batches`)."""

    line: str
    members: tuple[int, ...]


# Prefixes per command. ExaBGP's reactor runs 50 steps of queued commands (one per route) per
# loop pass and, when no new command arrived in the pass, polls for 10 ms before the next:
# with 500-route commands 10,000 routes cost ~200 such naps (~2 s). Commands of 50, acked
# each pass, keep new commands (which wake it) arriving. bench/announce_rate.py measures both.
MAX_BATCH: Final = 50


def batches(changes: Sequence[RouteChange], max_routes: int = MAX_BATCH) -> list[Batch]:
    """The commands that carry `changes`: changes alike (announce with the same attributes,
    or withdraw; same family; same neighbours) share a command, up to `max_routes` each.

    Order: batches in the order of their first change. The reconciler never sends one prefix
    twice in a pass, so regrouping cannot reorder two commands about the same route. A lone
    change is sent as the plain ``announce route``/``withdraw route``. When ExaBGP answers
    ``error`` to a batch, the sender resends its changes one by one, so the error lands on
    the route that caused it (`speaker.send_changes`).
    """
    return [Batch(batch_line(changes, members), members) for members in batch_members(changes, max_routes)]


def batch_members(changes: Sequence[RouteChange], max_routes: int = MAX_BATCH) -> list[tuple[int, ...]]:
    """`batches` without their lines: the indexes each command carries, in the same order.
    `batch_line` builds a command's line; a sender builds each one as it sends it, so the
    first command leaves before the last line is built (10,000 prefixes spelled out)."""
    if max_routes < 1:
        raise ValueError(f"max_routes: {max_routes} is not at least 1")
    groups: dict[tuple[object, ...], list[int]] = {}
    for i, change in enumerate(changes):
        groups.setdefault((change.attrs, change.prefix.version, change.neighbors), []).append(i)
    return [tuple(members[start:start + max_routes])
            for members in groups.values() for start in range(0, len(members), max_routes)]


def batch_line(changes: Sequence[RouteChange], members: Sequence[int]) -> str:
    """The one command carrying ``changes[i] for i in members`` (alike: see `batch_members`)."""
    first = changes[members[0]]
    if len(members) == 1:
        return first.line()
    if first.attrs is None:
        return withdraw_batch_line([changes[i].prefix for i in members], first.neighbors)
    return announce_batch_line([changes[i].prefix for i in members], first.attrs, first.neighbors)


def eor_line(version: int, neighbors: Sequence[str] = ()) -> str:
    """End-of-RIB for IPv4 or IPv6 unicast (RFC 4724): needed with ``manual-eor true``."""
    if version not in (4, 6):
        raise ValueError(f"version: {version} is neither 4 nor 6")
    return f"{_selector(neighbors)}announce eor ipv{version} unicast"


def withdraw_line(prefix: Prefix, neighbors: Sequence[str] = ()) -> str:
    """The ExaBGP command that withdraws `prefix` from `neighbors` (default: every neighbour)."""
    return f"{_selector(neighbors)}withdraw route {prefix}"


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Ack:
    """ExaBGP's answer to the oldest unanswered command: ``done`` (ok) or ``error``."""

    ok: bool


@dataclass(frozen=True)
class NeighborState:
    """A BGP session changed state: "connected", "up" or "down" (with a reason)."""

    peer: str
    local: str
    state: str
    reason: str = ""


@dataclass(frozen=True)
class Shutdown:
    """ExaBGP is stopping; it will close our stdin next."""


@dataclass(frozen=True)
class Update:
    """An UPDATE received from a neighbour; prefixes only, the full line is in `raw`."""

    peer: str
    announced: tuple[str, ...]
    withdrawn: tuple[str, ...]
    raw: str


@dataclass(frozen=True)
class Unknown:
    """A well-formed JSON message we do not act on (negotiated, fsm, notification...)."""

    type: str
    raw: str


@dataclass(frozen=True)
class Garbage:
    """A line that is neither an ack nor a well-formed ExaBGP message."""

    raw: str
    error: str


Event = Ack | NeighborState | Shutdown | Update | Unknown | Garbage

_TEXT_ACKS: Final = {"done": True, "error": False}


def parse_line(line: str) -> Event:
    """Classify one line ExaBGP wrote to the API process. Never raises."""
    text = line.strip()
    if text in _TEXT_ACKS:
        return Ack(_TEXT_ACKS[text])
    if not text:
        return Garbage(line, "empty line")
    try:
        message = json.loads(text)
    except (ValueError, RecursionError) as exc:  # RecursionError: 100,000 levels of nesting
        return Garbage(line, f"not JSON: {str(exc)[:200]}")
    if not isinstance(message, dict):
        return Garbage(line, "JSON but not an object")
    try:
        return _classify(message, text)
    except (KeyError, TypeError, AttributeError) as exc:
        return Garbage(line, f"malformed {message.get('type', 'message')!r} message: {exc!r}")


def _classify(message: dict[str, Any], text: str) -> Event:
    # ExaBGP can also ack in JSON ({"answer": "done"}); 5.0.15 never enables it, but
    # accepting it costs nothing and keeps the ack FIFO in step if a version does.
    answer = message.get("answer")
    if answer in _TEXT_ACKS:
        return Ack(_TEXT_ACKS[answer])
    kind = message.get("type")
    if kind == "state":
        neighbor = message["neighbor"]
        return NeighborState(
            peer=_str(neighbor["address"]["peer"]),
            local=_str(neighbor["address"]["local"]),
            state=_str(neighbor["state"]),
            reason=_str(neighbor.get("reason", "")),
        )
    # "notification" is also the type of a BGP NOTIFICATION received from a peer; only
    # the top-level string "shutdown" means ExaBGP itself is going away.
    if kind == "notification" and message.get("notification") == "shutdown":
        return Shutdown()
    if kind == "update":
        neighbor = message["neighbor"]
        # An End-of-RIB marker is an "update" whose message holds "eor", not "update".
        update = neighbor["message"].get("update", {})
        announced = [
            _str(nlri["nlri"])
            for by_next_hop in update.get("announce", {}).values()
            for nlris in by_next_hop.values()
            for nlri in nlris
        ]
        withdrawn = [_str(nlri["nlri"]) for nlris in update.get("withdraw", {}).values() for nlri in nlris]
        return Update(
            peer=_str(neighbor["address"]["peer"]),
            # ExaBGP lists a prefix once per next hop (global and link-local for IPv6).
            announced=tuple(dict.fromkeys(announced)),
            withdrawn=tuple(dict.fromkeys(withdrawn)),
            raw=text,
        )
    return Unknown(type=kind if isinstance(kind, str) else "", raw=text)


def _str(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"expected a string, got {value!r}")
    return value
