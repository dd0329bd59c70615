"""Read untyped YAML data into typed values while collecting every error with its path.

The loaders walk the YAML tree with a :class:`Node`. Each accessor returns a typed value
or a fallback, and records an issue instead of raising, so one pass reports *all* that is
wrong (the way ``anycastctl validate`` should). Unknown keys are errors: a typo such as
``intreval`` must not silently fall back to a default.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import yaml

from .errors import ConfigError, ConfigIssue

T = TypeVar("T")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_MISSING = object()


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
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


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML text safely; syntax errors become a ConfigError naming line and column."""
    if yaml.__with_libyaml__:
        try:
            return yaml.load(text, Loader=_FastUniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
        except yaml.YAMLError:
            pass  # parsed again below: the pure-Python parser's messages say more
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "YAML"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [ConfigIssue(where, f"invalid YAML: {problem}")]) from None


def read_text(path: str) -> str:
    """Read a config file; an unreadable file is a ConfigError, not a traceback."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(path, [ConfigIssue("", f"cannot read file: {exc.strerror}")]) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(path, [ConfigIssue("", f"not UTF-8 text: {exc.reason}")]) from None


class Issues:
    """Collects issues during one load."""

    def __init__(self) -> None:
        self.items: list[ConfigIssue] = []

    def add(self, path: str, message: str) -> None:
        self.items.append(ConfigIssue(path, message))


class Node:
    """A value in the YAML tree together with its path, for typed, error-collecting reads."""

    def __init__(self, value: Any, path: str, issues: Issues) -> None:
        self.value = value
        self.path = path
        self.issues = issues
        self._used: set[str] = set()

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
        if key not in self.value or self.value[key] is None:
            if required:
                self.error("required", key)
            return None
        return Node(self.value[key], self.child_path(key), self.issues)

    def items(self) -> Iterator[Node]:
        """Children of a list node (a non-list is an error and yields nothing)."""
        if self.value is None:
            return
        if not isinstance(self.value, list):
            self.error(f"expected a list, got {_kind(self.value)}")
            return
        for i, item in enumerate(self.value):
            yield Node(item, self.child_path(i), self.issues)

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
                return ipaddress.ip_address(self.value)
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
