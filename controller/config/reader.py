"""Read untyped YAML data into typed values while collecting every error with its path.

The loaders walk the YAML tree with a :class:`Node`. Each accessor returns a typed value
or a fallback, and records an issue instead of raising, so one pass reports *all* that is
wrong (the way ``anycastctl validate`` should). Unknown keys are errors: a typo such as
``intreval`` must not silently fall back to a default.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import ipaddress
import json
import math
import os
import stat
from collections.abc import Callable, Hashable, Iterator
from typing import Any, TypeVar

import yaml

from .errors import ConfigError, ConfigIssue

T = TypeVar("T")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_MISSING = object()


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML keeps the last one silently)."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # A node YAML resolves but Python cannot build (a date 2026-13-01, an integer of more
        # than 4,300 digits; a tag: ``!!float x``, ``!!bool x``, ``!!set [1]``) raised
        # ValueError, KeyError, TypeError...: a traceback from the validator and a dead daemon
        # on reload, where a bad config must be refused.
        try:
            return yaml.constructor.BaseConstructor.construct_object(self, node, deep=deep)  # (borrowed, as below)
        except (yaml.YAMLError, RecursionError, MemoryError):
            raise  # (worded by parse_yaml_only and load_desired)
        except Exception as exc:  # noqa: BLE001 - whatever PyYAML's constructors raise
            what = repr(node.value[:40]) if isinstance(node.value, str) else "this node"
            detail = f": {str(exc)[:200]}" if isinstance(exc, ValueError) else ""
            raise yaml.constructor.ConstructorError(
                None, None, f"cannot read {what} as {node.tag}{detail}", node.start_mark) from None

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        if not isinstance(node, yaml.MappingNode):  # (``!!set [1]``: PyYAML's own error, not a TypeError here)
            return yaml.constructor.SafeConstructor.construct_mapping(self, node, deep=deep)
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):  # (``? [a]``: a TypeError below, not YAML's own error)
                raise yaml.constructor.ConstructorError(None, None, "a list or mapping as a key",
                                                        key_node.start_mark)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None,
                    f"duplicate key {key!r} (first at line {seen[key] + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        # Named, not super(): _FastUniqueKeyLoader borrows this method.
        return yaml.constructor.SafeConstructor.construct_mapping(self, node, deep=deep)


if yaml.__with_libyaml__:
    class _FastUniqueKeyLoader(yaml.CSafeLoader):
        """The same with libyaml's parser: a 10,000-VIP desired state loads several times faster."""

        construct_mapping = _UniqueKeyLoader.construct_mapping
        construct_object = _UniqueKeyLoader.construct_object


# Bounds on what one config file may be. A desired state of 100,000 VIPs in one file is
# ~55 MB of YAML; a config needs a handful of levels (vips[0].checks[0].http.expect ...).
MAX_FILE_BYTES = 64 << 20
MAX_DEPTH = 32


class _NotJson(Exception):
    """The text is not plain JSON as YAML reads it (a duplicate key, NaN): the YAML loader decides."""


_YAML_RESOLVER: Any = yaml.resolver.Resolver()  # PyYAML is untyped
_YAML_FLOAT = "tag:yaml.org,2002:float"
_YAML_STR = "tag:yaml.org,2002:str"


def plain_is_str(text: str) -> bool:
    """Whether YAML's resolver makes ``text``, a plain scalar, a string (not ``yes``, ``1.5``,
    ``null``, a date...): the loader then gives ``text`` itself."""
    return bool(_YAML_RESOLVER.resolve(yaml.ScalarNode, text, (True, False)) == _YAML_STR)


def _yaml_number(literal: str) -> Any:
    """A JSON number with a fraction or exponent as PyYAML (YAML 1.1) reads the same text: a
    float only if its float pattern matches (it wants a dot: ``1e5`` and ``1.5e5`` are strings)."""
    if _YAML_RESOLVER.resolve(yaml.ScalarNode, literal, (True, False)) == _YAML_FLOAT:
        return float(literal)
    return literal


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    mapping = dict(pairs)
    if len(mapping) != len(pairs):
        raise _NotJson  # the YAML loader names the duplicate and its line
    return mapping


def _refuse_constant(_name: str) -> Any:
    raise _NotJson  # NaN, Infinity: not JSON; YAML reads them as strings


def parse_json(text: str) -> Any:
    """``text`` parsed as JSON, as the YAML loader would read it; else raises ``_NotJson``. JSON is YAML's
    flow style, and a generated config (10,000 VIPs) often is JSON: json's C parser reads it
    ~40x faster than libyaml's composer plus PyYAML's constructor. Every value is what YAML gives
    for the same text: strings are quoted (never resolved to other types), integers are
    decimal, numbers PyYAML reads as strings stay strings (``_yaml_number``); a duplicate key,
    NaN or anything json refuses goes to the YAML loader, which decides and words the error."""
    try:
        return json.loads(text, object_pairs_hook=_unique_pairs, parse_float=_yaml_number,
                          parse_constant=_refuse_constant)
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise _NotJson from exc


def tree_depth(data: Any, limit: int) -> int:
    """``nesting_depth`` for a tree (what json gives: no shared subtrees, no cycles), level by
    level: a few times cheaper. Stops once past ``limit``."""
    depth, level = 0, [data] if isinstance(data, (dict, list)) else []
    while level and depth <= limit:
        depth += 1
        below: list[Any] = []
        for value in level:
            below.extend(c for c in (value.values() if isinstance(value, dict) else value)
                         if isinstance(c, (dict, list)))
        level = below
    return depth


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text safely; syntax errors become a ConfigError naming line and column, and
    so does nesting deeper than MAX_DEPTH (libyaml stops at 1,000 levels, the pure-Python
    parser recurses until RecursionError; either is refused here, never a traceback). A text
    that is JSON takes json's parser (``parse_json``): the same values, much faster."""
    if text.lstrip(" \t\r\n")[:1] in ("{", "["):
        try:
            data = parse_json(text)
        except _NotJson:
            pass
        except RecursionError:  # json's parser met thousands of levels: refused as YAML would
            raise ConfigError(source, [ConfigIssue("YAML", f"nested deeper than {MAX_DEPTH} levels")]) from None
        else:
            if tree_depth(data, MAX_DEPTH) > MAX_DEPTH:
                raise ConfigError(source, [ConfigIssue("YAML", f"nested deeper than {MAX_DEPTH} levels")])
            return data
    return parse_yaml_only(text, source)


def parse_yaml_only(text: str, source: str) -> Any:
    """``parse_yaml`` without the JSON path: PyYAML (libyaml's parser when present)."""
    if yaml.__with_libyaml__:
        try:
            data = yaml.load(text, Loader=_FastUniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
        except yaml.YAMLError:
            pass  # parsed again below: the pure-Python parser's messages say more
        else:
            return _shallow(data, source)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except RecursionError:
        raise ConfigError(source, [ConfigIssue("YAML", f"nested deeper than {MAX_DEPTH} levels")]) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        problem = getattr(exc, "problem", None) or str(exc)
        if "nesting depth" in problem:
            problem = f"nested deeper than {MAX_DEPTH} levels ({problem})"
        raise ConfigError(source, [ConfigIssue(where, f"invalid YAML: {problem}")]) from None
    return _shallow(data, source)


def parse_yaml_first(text: str) -> Any:
    """``text`` parsed by the loader parse_yaml_only tries first (libyaml's when present), with
    no fallback, no depth check and no wording: whatever it raises is raised. For a caller that
    parses pieces of a text and, on any error, lets parse_yaml_only decide about the whole."""
    return yaml.load(text, Loader=_FastUniqueKeyLoader if yaml.__with_libyaml__ else _UniqueKeyLoader)  # noqa: S506


def nesting_depth(data: Any, limit: int) -> int:
    """How deeply lists and mappings nest in ``data`` (a scalar is 0): the longest path, counted
    without recursion, stopping once past ``limit``. Shared subtrees (YAML aliases) are
    measured once, so a billion-laughs document costs its size, not its expansion; a
    structure that contains itself is infinitely deep (``limit + 1``)."""
    heights: dict[int, int] = {}
    open_: set[int] = set()  # the containers on the current path: meeting one again is a cycle
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:
        value, done = stack.pop()
        if not isinstance(value, (dict, list)):
            continue
        key = id(value)
        children = [c for c in (value.values() if isinstance(value, dict) else value) if isinstance(c, (dict, list))]
        if done:
            open_.discard(key)
            heights[key] = 1 + max((heights[id(c)] for c in children), default=0)
            if heights[key] > limit:
                return heights[key]
        elif key in open_:
            return limit + 1
        elif key not in heights:
            open_.add(key)
            stack.append((value, True))
            stack.extend((c, False) for c in children)
    return heights.get(id(data), 0)


def _shallow(data: Any, source: str) -> Any:
    depth = nesting_depth(data, MAX_DEPTH)
    if depth > MAX_DEPTH:
        raise ConfigError(source, [ConfigIssue("YAML", f"nested deeper than {MAX_DEPTH} levels")])
    return data


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _kind_of(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def read_bytes(path: str, inside: str | None = None, limit: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of the regular file at ``path``, or a ConfigError naming it. With ``inside``
    (a config checkout), the file must resolve inside that directory: a committed symlink to
    /dev/zero, to a FIFO or to /etc/shadow is refused without being opened. Never follows a
    device or a pipe, never reads more than ``limit`` bytes (one more, to know it is over)."""
    def refuse(message: str) -> ConfigError:
        return ConfigError(path, [ConfigIssue("", message)])

    target = path
    if inside is not None:
        top, target = os.path.realpath(inside), os.path.realpath(path)
        if os.path.commonpath([top, target]) != top:
            raise refuse(f"a symlink to {target}, outside the config directory {top}: refused")
    try:
        before = os.stat(target)
        if not stat.S_ISREG(before.st_mode):
            raise refuse(f"{_kind_of(before.st_mode)}, not a regular file: refused")
        if before.st_size > limit:
            raise refuse(f"{before.st_size} bytes, more than the {limit} a config file may have: refused")
        # O_NONBLOCK: if the file was swapped for a FIFO since the stat, open() does not hang.
        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC | (os.O_NOFOLLOW if inside else 0))
    except OSError as exc:
        raise refuse(f"cannot read file: {exc.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        now = os.fstat(f.fileno())
        if not stat.S_ISREG(now.st_mode) or (now.st_dev, now.st_ino) != (before.st_dev, before.st_ino):
            raise refuse("changed while being read (not the regular file it was): refused")
        try:
            data = f.read(limit + 1)
        except OSError as exc:
            raise refuse(f"cannot read file: {exc.strerror}") from None
    if len(data) > limit:
        raise refuse(f"more than the {limit} bytes a config file may have: refused")
    return data


def read_text(path: str, inside: str | None = None) -> str:
    """Read a config file (see read_bytes); an unreadable or hostile file is a ConfigError
    naming it, not a traceback or a hang."""
    return decode_text(path, read_bytes(path, inside))


def decode_text(path: str, data: bytes) -> str:
    """``data`` (what read_bytes read from ``path``) as text, as read_text says it."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(path, [ConfigIssue("", f"not UTF-8 text: {exc.reason}")]) from None


class Issues:
    """Collects issues during one load."""

    def __init__(self) -> None:
        self.items: list[ConfigIssue] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(ConfigIssue(path, message))


class Node:
    """A value in the YAML tree together with its path, for typed, error-collecting reads.

    A child's path is spelled out only when asked for (an error, mostly): a 10,000-VIP config
    makes ~130,000 nodes and names almost none of them."""

    __slots__ = ("value", "issues", "_path", "_parent", "_key", "_used")

    def __init__(self, value: Any, path: str, issues: Issues) -> None:
        self.value = value
        self.issues = issues
        self._path: str | None = path
        self._parent: Node | None = None
        self._key: str | int = ""
        self._used: set[str] = set()

    def _child(self, value: Any, key: str | int) -> Node:
        child = Node.__new__(Node)
        child.value, child.issues, child._path, child._parent, child._key = value, self.issues, None, self, key
        child._used = set()
        return child

    @property
    def path(self) -> str:
        if self._path is None:
            assert self._parent is not None  # only children have no path yet
            self._path = self._parent.child_path(self._key)
        return self._path

    # --- structure -------------------------------------------------------------------
    def child_path(self, key: str | int) -> str:
        if isinstance(key, int):
            return f"{self.path}[{key}]"
        return f"{self.path}.{key}" if self.path else key

    def error(self, message: str, key: str | int | None = None) -> None:
        self.issues.add(self.child_path(key) if key is not None else self.path, message)

    def is_mapping(self) -> bool:
        if isinstance(self.value, dict):
            return True
        self.error(f"expected a mapping, got {_kind(self.value)}")
        return False

    def has(self, key: str) -> bool:
        return isinstance(self.value, dict) and key in self.value

    def get(self, key: str, required: bool = False) -> Node | None:
        """The child node at ``key``; None if absent (an error if required)."""
        self._used.add(key)
        if not isinstance(self.value, dict):
            return None
        value = self.value.get(key)
        if value is None:
            if required:
                self.error("required", key)
            return None
        return self._child(value, key)

    def items(self) -> Iterator[Node]:
        """Children of a list node (a non-list is an error and yields nothing)."""
        if self.value is None:
            return
        if not isinstance(self.value, list):
            self.error(f"expected a list, got {_kind(self.value)}")
            return
        for i, item in enumerate(self.value):
            yield self._child(item, i)

    def reject_unknown(self) -> None:
        """Report keys that no accessor asked for. Call after reading a mapping."""
        if not isinstance(self.value, dict):
            return
        for key in self.value:
            if key not in self._used:
                known = ", ".join(sorted(self._used))
                self.error(f"unknown key (known keys here: {known})", str(key))

    # --- scalars ---------------------------------------------------------------------
    def as_str(self) -> str | None:
        if isinstance(self.value, str) and self.value.strip():
            return self.value
        self.error(f"expected a non-empty string, got {_kind(self.value)}")
        return None

    def as_bool(self) -> bool | None:
        if isinstance(self.value, bool):
            return self.value
        self.error(f"expected true or false, got {_kind(self.value)}")
        return None

    def as_int(self, lo: int | None = None, hi: int | None = None) -> int | None:
        v = self.value
        if isinstance(v, bool) or not isinstance(v, int):
            self.error(f"expected an integer, got {_kind(v)}")
            return None
        return self._bounded(v, lo, hi)  # type: ignore[no-any-return]

    def as_float(self, lo: float | None = None, hi: float | None = None) -> float | None:
        v = self.value
        if isinstance(v, int) and not isinstance(v, bool) and not _finite(v):
            self.error(f"too large: a number of {len(str(abs(v)))} digits")
            return None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            self.error(f"expected a number, got {_kind(v)}")
            return None
        return self._bounded(float(v), lo, hi)  # type: ignore[no-any-return]

    def as_choice(self, choices: tuple[str, ...]) -> str | None:
        if isinstance(self.value, str) and self.value in choices:
            return self.value
        self.error(f"expected one of {', '.join(choices)}, got {self.value!r}")
        return None

    def as_address(self) -> IPAddress | None:
        if isinstance(self.value, str):
            try:
                return ip_address(self.value)
            except ValueError:
                pass
        self.error(f"not an IP address: {self.value!r}")
        return None

    def as_network(self) -> IPNetwork | None:
        if not isinstance(self.value, str):
            self.error(f"expected a prefix like 198.51.100.0/24, got {_kind(self.value)}")
            return None
        try:
            return ipaddress.ip_network(self.value, strict=True)
        except ValueError as exc:
            self.error(f"not a valid prefix: {exc}")
            return None

    def _bounded(self, v: Any, lo: Any, hi: Any) -> Any:
        if lo is not None and v < lo:
            self.error(f"must be >= {lo}, got {v}")
            return None
        if hi is not None and v > hi:
            self.error(f"must be <= {hi}, got {v}")
            return None
        return v

    # --- convenience: optional keys with defaults ------------------------------------
    def opt(self, key: str, read: Callable[[Node], T | None], default: T) -> T:
        node = self.get(key)
        if node is None:
            return default
        value = read(node)
        return default if value is None else value

    def req(self, key: str, read: Callable[[Node], T]) -> T | None:
        # ``read`` returns its value or None (T includes None); typed this way so mypy keeps
        # a union such as IPv4Address | IPv6Address instead of joining it to a base class.
        node = self.get(key, required=True)
        return None if node is None else read(node)


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside: a typed build of 10,000 VIPs allocates ~500,000
    objects that all live on, so each collection rescans what the last one kept (~40 % of
    the load's CPU). What a load throws away has no cycles: reference counting frees it.
    Collection resumes on the way out unless something else had paused it."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@functools.lru_cache(maxsize=1 << 16)
def ip_address(text: str) -> IPAddress:
    """``ipaddress.ip_address``, each text parsed once: next hops and backends repeat across
    thousands of VIPs, and parsing is most of a VIP's typed build. Addresses are immutable,
    so sharing one is safe; a ValueError is raised again each time (not cached)."""
    return ipaddress.ip_address(text)


def _finite(v: int) -> bool:
    """Whether a float can hold ``v``: an integer past 1.8e308 (``1`` and 400 zeros) raised
    OverflowError from math.isfinite, a traceback instead of the path's error."""
    try:
        return math.isfinite(v)
    except OverflowError:
        return False


def _kind(v: Any) -> str:
    if v is None:
        return "nothing"
    if isinstance(v, bool):
        return f"boolean {v}"
    if isinstance(v, (int, float)):
        return f"number {v}"
    if isinstance(v, str):
        return f"string {v!r}"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "a mapping"
    return type(v).__name__
