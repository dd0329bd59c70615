"""Load the central controller's desired state from a directory of YAML kept in git.

Layout (``configs/controller/`` is a complete example)::

    controller.yaml   listen addresses, state_dir, allowed_prefixes, operator token hash,
                      global policy, check_defaults, default BGP attributes
    pops.yaml         the POP inventory: name, sha256 of the agent's bearer token
    vips.yaml         the VIPs: an agent VIP definition plus publish, enabled, policy
    vips/*.yaml       more VIPs (optional; same format, one list per file)

Every error names its file and path (``vips.yaml: vips[0].publish[1]: unknown POP 'lhr'``).
The loader is the same for ``anycastctl validate``, start-up and every reload.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import os
import re
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any, TypeVar

from .agent import (
    DEFAULT_DRAINING, DEFAULT_UP, read_absolute_path, read_check_defaults, read_host_port, read_name,
    read_state_attributes, read_vip, refuse_empty,
)
from .desired_model import (
    FULL_DIAL, MAX_WEIGHT, NO_STEERING, ApiSettings, ChangePolicy, DampeningPolicy, DesiredState, DrainPolicy,
    FailoverPolicy, FleetVip, HaSettings, Policy, PopSpec, Preference, SafetyPolicy, Steering, StoreKind, TlsSettings,
    plain_http_refusal,
    with_dials,
)
from .errors import ConfigError, ConfigIssue
from .model import IPNetwork, StateAttributes
from .reader import (
    MAX_DEPTH, Issues, Node, decode_text, nesting_depth, parse_yaml, parse_yaml_first, plain_is_str, read_text,
)

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
T = TypeVar("T")
FILES = ("controller.yaml", "pops.yaml", "vips.yaml")


DEFAULT_STATE_DIR = "/var/lib/anycast-controller"


@dataclass
class LoadCache:
    """What the last successful load read, for the next one (the daemon keeps one): a file
    whose text is unchanged is not parsed again; in a changed VIP file only the list entries
    whose text changed are parsed (see _split_vips); a VIP whose definition and context are
    unchanged is not read again. At 10,000 VIPs in one file a reload after a one-line commit
    goes from ~3 s to parsing one entry. Only a load without errors updates it."""

    files: dict[str, tuple[str, Any]] = field(default_factory=dict)  # file -> (text, parsed)
    vips: dict[str, tuple[Any, tuple[Any, ...], FleetVip]] = field(default_factory=dict)  # name -> (raw, context, VIP)
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)  # file -> entry text -> parsed entry
    prefixes: dict[IPNetwork, str] = field(default_factory=dict)  # address -> VIP, of ``vips``
    cuts: dict[str, _Cut] = field(default_factory=dict)  # VIP file -> its text cut into entries (_cut_again)
    # path -> bytes read for the next load just before it, by the same reader (the daemon's
    # fingerprint of the checkout): used once, instead of reading (and resolving) each file again
    prefetched: dict[str, bytes] = field(default_factory=dict)
    # path -> sha256 of each file's bytes as that fingerprint saw them (read, or known unchanged
    # by its stat data: revision.FileStats), used once like ``prefetched``; and file -> the
    # sha256 of the bytes ``files`` holds the text of, where the load had it. A file whose
    # digest is the one loaded is taken as it is, neither read nor decoded nor compared (the
    # daemon's reload at 100,000 VIPs in 100 files decoded and compared 193 MB a commit).
    digests_now: dict[str, bytes] = field(default_factory=dict)
    digests: dict[str, bytes] = field(default_factory=dict)
    # VIP file -> (its parsed value as ``files`` holds it, the context its VIPs were read in,
    # its VIPs, their ``vips`` entries): a file whose text and context are unchanged gives its
    # VIPs back in one piece (with 10,000 VIPs in 100 files a one-file commit walked them all).
    by_file: dict[str, tuple[Any, Any, tuple[FleetVip, ...], dict[str, tuple[Any, tuple[Any, ...], FleetVip]]]] = field(
        default_factory=dict)
    # (A VIP read from an entry of its own is kept as a _Read token, not as its parsed YAML
    # tree: the typed FleetVip is what serves; at 10,000 VIPs the trees were ~55 MB.)


@dataclass(frozen=True, slots=True)
class _Read:
    """In a LoadCache, in place of a VIP entry's parsed tree: the entry's text and name. Its
    VIP is reused while the entry's text and context are unchanged, or while its text parses
    to the same tree (``shape``: a digest of it, keys sorted; a reformatted file); else the
    text is parsed again (it parsed alone before)."""

    text: str
    name: str
    shape: bytes


def _shape(raw: Any, shared: dict[int, tuple[Any, str]] | None = None) -> bytes:
    """What ``==`` compares of a parsed tree (mappings in any key order), as a digest.
    ``shared``: the texts of subtrees met before in the same pass (by identity; see _canonical)."""
    return hashlib.blake2b(_canonical(raw, {} if shared is None else shared).encode(), digest_size=16).digest()


def _canonical(v: Any, shared: dict[int, tuple[Any, str]]) -> str:
    """``repr`` of the tree with each mapping ``("{", ((repr(key), value), ...))`` sorted by key
    and each list ``("[", (value, ...))``, written out: a subtree several trees share (the
    values _parse_entry shares: one publish list in every VIP) is written once a pass, kept in
    ``shared`` (a subtree held once is not kept: nothing would meet it again)."""
    if isinstance(v, dict):
        pairs = sorted(((repr(k), x) for k, x in v.items()), key=lambda kv: kv[0])
        return "('{', " + _tuple([f"({k!r}, {_child(x, shared)})" for k, x in pairs]) + ")"
    if isinstance(v, list):
        return "('[', " + _tuple([_child(x, shared) for x in v]) + ")"
    return repr(v)


def _child(v: Any, shared: dict[int, tuple[Any, str]]) -> str:
    if not isinstance(v, (dict, list)):
        return repr(v)
    hit = shared.get(id(v))
    if hit is not None:
        return hit[1]
    text = _canonical(v, shared)
    if sys.getrefcount(v) > 3:  # (the parent, this frame's name, the argument: more is sharing)
        shared[id(v)] = (v, text)
    return text


def _tuple(items: list[str]) -> str:
    return f"({items[0]},)" if len(items) == 1 else "(" + ", ".join(items) + ")"


# What makes the text of one entry mean something that depends on another entry (anchors,
# aliases, merge keys, tags) or on the document (directives, several documents): such a file
# is parsed whole.
_ENTANGLED = re.compile(r"(?:^|[\s\[{,])[&*!]\S|^(?:---|\.\.\.|%)", re.MULTILINE)
_DOCUMENT_MARKS = ("---", "...", "%")


def _entangled(text: str) -> bool:
    """``_ENTANGLED.search(text)``, with substring scans in C first: the regex alone takes
    ~0.3 s over a 5.5 MB file that has none of these characters (the usual case)."""
    if any(c in text for c in "&*!") and _ENTANGLED.search(text):
        return True
    return text.startswith(_DOCUMENT_MARKS) or any(f"\n{m}" in text for m in _DOCUMENT_MARKS)


_VIPS_KEY = re.compile(r"^vips:[ \t]*(?:#.*)?\n?$")


def _split_vips(text: str) -> list[str] | None:
    """The text of a VIP file cut into its list entries, or None unless the file has the plain
    shape where that is exact: comments, one ``vips:`` line at column 0, then entries that each
    start with ``- `` at one indentation, every other line of them indented deeper (or blank or
    a comment). Parsing each entry alone then gives what parsing the file gives; anything else
    (another top-level key, flow style, anchors, tabs, a continuation line at the entries'
    indentation) is parsed whole, so its errors keep their line numbers.

    Cut with regular expressions (in C): the line-by-line cut (``_split_vips_lines``, which
    says the same, as a randomized test checks) took ~0.3 s of a one-VIP reload of a 5.5 MB
    file. A text with whitespace other than spaces and newlines takes the line-by-line cut
    (what ``str.strip`` counts as blank is then more than the expressions know)."""
    if "\t" in text or _entangled(text):
        return None
    if not text.isascii() or any(c in text for c in _ODD_SPACE):
        return _split_vips_lines(text)
    head = _BLANK_LINES.match(text)
    start = head.end() if head else 0
    end = text.find("\n", start)
    end = len(text) if end < 0 else end + 1
    if start == len(text) or not _VIPS_KEY.match(text[start:end]):
        return None
    blanks = _BLANK_LINES.match(text, end)
    first = blanks.end() if blanks else end
    if _UNPRINTABLE.search(text, 0, first):
        return None  # (in the head's comments: no entry's parse would see it; the whole parse refuses it)
    entry = _ENTRY.match(text, first)
    if entry is None:
        return None
    indent = entry.end() - first - 2
    # (each pattern starts with a newline: a search that tries ``^`` at every character is slow)
    if re.compile(rf"\n(?! {{{indent}}}- ) {{0,{indent}}}[^ #\n]").search(text, first):
        return None  # a line at or left of the entries' indentation that starts no entry
    starts = [first, *(m.start() + 1 for m in re.compile(rf"\n {{{indent}}}- ").finditer(text, first))]
    return [text[a:b] for a, b in zip(starts, [*starts[1:], len(text)])]


# Blank to str.strip() but not to the expressions above (ASCII; anything else is cut line by line)
_ODD_SPACE = "\r\x0b\x0c\x1c\x1d\x1e\x1f"
_BLANK_LINES = re.compile(r"(?: *(?:#[^\n]*)?\n)*")
_ENTRY = re.compile(r" *- ")
# What YAML refuses anywhere, comments too (its printable set, YAML 1.1 as libyaml reads it)
_UNPRINTABLE = re.compile("[^\x09\x0a\x0d\x20-\x7e\x85\xa0-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _split_vips_lines(text: str) -> list[str] | None:
    """``_split_vips``, line by line (the definition the expressions follow)."""
    if "\t" in text or _entangled(text):
        return None
    lines = text.splitlines(keepends=True)
    i = 0
    while i < len(lines) and _blank(lines[i]):
        i += 1
    if i == len(lines) or not _VIPS_KEY.match(lines[i]):
        return None
    j = i + 1
    while j < len(lines) and _blank(lines[j]):
        j += 1
    if any(_UNPRINTABLE.search(line) for line in lines[:j]):
        return None  # (as _split_vips)
    entries: list[list[str]] = []
    indent: int | None = None
    for line in lines[i + 1:]:
        if _blank(line):
            if entries:
                entries[-1].append(line)
            continue
        lead = len(line) - len(line.lstrip(" "))
        if line.startswith("- ", lead) and (indent is None or lead == indent):
            indent = lead
            entries.append([line])
        elif indent is None or lead <= indent:
            return None
        else:
            entries[-1].append(line)
    return ["".join(e) for e in entries] if entries else None


def _blank(line: str) -> bool:
    stripped = line.strip()
    return not stripped or stripped.startswith("#")


@dataclass(frozen=True, slots=True)
class _Cut:
    """A VIP file's text as _split_vips cut it: its entries, where each starts, the entries'
    indentation, and whether the text is plain (ASCII, no whitespace but spaces and newlines:
    the expressions' cut, which a cut of only the changed lines can follow)."""

    text: str
    entries: list[str]
    starts: list[int]
    indent: int
    plain: bool


def _cut(text: str) -> _Cut | None:
    """_split_vips(text), with where each entry starts."""
    entries = _split_vips(text)
    if entries is None:
        return None
    first = len(text) - sum(map(len, entries))
    starts = list(itertools.accumulate(map(len, entries[:-1]), initial=first))
    indent = len(entries[0]) - len(entries[0].lstrip(" "))
    plain = text.isascii() and not any(c in text for c in _ODD_SPACE)
    return _Cut(text, entries, starts, indent, plain)


def _cut_again(text: str, previous: _Cut | None) -> tuple[_Cut | None, int, int]:
    """``_cut(text)``, found from the last cut of the same file by cutting only the lines that
    changed (a one-VIP commit of a 5.5 MB file: ~40 ms of the whole cut's scans become a few
    of finding where the texts differ). Lines are what the cut looks at one by one, and the
    whole-file conditions (no tab, no anchor, alias, tag or document mark, every line at or
    left of the entries' indentation starting an entry) are each about one line: the lines
    both texts share (the common head and tail) were found good last time and still cut the
    same, so only the entries on the other lines are cut again, and the conditions checked
    there. The head of the file (up to the first entry's first line, which gives the
    indentation) must be unchanged, and the text plain, else the whole text is cut. Also says
    how many entries at the start and at the end are the previous cut's (the same strings)."""
    if previous is None or not previous.plain or not text.isascii():
        return _cut(text), 0, 0
    old = previous.text
    head = _common_head(old, text)
    if head == len(old) == len(text):
        return previous, len(previous.entries), 0
    tail = _common_tail(old, text, min(len(old), len(text)) - head)
    starts, indent = previous.starts, previous.indent
    first_line = old.find("\n", starts[0])
    changed_from = text.rfind("\n", 0, head) + 1  # the first line that differs
    if first_line < 0 or changed_from <= first_line:
        return _cut(text), 0, 0  # the head of the file or the first entry's first line changed
    shift = len(text) - len(old)
    changed_to = text.find("\n", len(text) - tail)  # the newline that ends the last line that differs
    changed_to = len(text) if changed_to < 0 else changed_to + 1
    # Entries [0, a) end on a line before the first that differs; entries [b, n) start on a
    # line after the last that differs (in the old text's places).
    a = bisect.bisect_left(starts, changed_from) - 1
    b = bisect.bisect_left(starts, changed_to - shift)
    lo = starts[a]
    hi = starts[b] + shift if b < len(starts) else len(text)
    seg = text[lo - 1:hi]  # (from the newline before entry a: every line of it starts after a newline)
    if "\t" in seg or _entangled(seg) or any(c in seg for c in _ODD_SPACE):
        return _cut(text), 0, 0  # (None, or the line-by-line cut: what the whole cut says)
    if re.compile(rf"\n(?! {{{indent}}}- ) {{0,{indent}}}[^ #\n]").search(seg):
        return None, 0, 0  # a line at or left of the entries' indentation that starts no entry
    middle = [lo, *(lo + m.start() for m in re.compile(rf"\n {{{indent}}}- ").finditer(seg, 1))]
    cut = [text[x:y] for x, y in zip(middle, [*middle[1:], hi])]
    moved = starts[b:] if not shift else [s + shift for s in starts[b:]]
    return _Cut(text, [*previous.entries[:a], *cut, *previous.entries[b:]], [*starts[:a], *middle, *moved], indent,
                True), a, len(starts) - b


_CHUNK = 1 << 16


def _common_head(a: str, b: str) -> int:
    """How many characters ``a`` and ``b`` share at their start (compared in C, a chunk at a time)."""
    n = min(len(a), len(b))
    lo = 0
    while lo < n and b.startswith(a[lo:min(n, lo + _CHUNK)], lo):
        lo += _CHUNK
    if lo >= n:
        return n
    hi = min(n, lo + _CHUNK)  # a[lo:hi] != b[lo:hi]: halve it down to the first character that differs
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if b.startswith(a[lo:mid], lo):
            lo = mid
        else:
            hi = mid
    return lo


def _common_tail(a: str, b: str, most: int) -> int:
    """How many characters ``a`` and ``b`` share at their end, at most ``most``."""
    n = 0
    la, lb = len(a), len(b)
    while n < most and b.endswith(a[la - min(most, n + _CHUNK):la - n], 0, lb - n):
        n += _CHUNK
    if n >= most:
        return most
    lo, hi = n, min(most, n + _CHUNK)  # the last lo characters are shared, the last hi are not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if b.endswith(a[la - mid:la - lo], 0, lb - lo):
            lo = mid
        else:
            hi = mid
    return lo


def _parse_vips_file(text: str, name: str, previous: dict[str, Any], into: dict[str, Any],
                     cut: _Cut | None = None, cuts: dict[str, _Cut] | None = None,
                     parsed: Any = None, memo: dict[str, Any] | None = None) -> tuple[Any, tuple[int, int] | None]:
    """``text`` parsed, reusing ``previous`` (entry text -> parsed entry) for entries whose text
    is unchanged and recording every entry in ``into``; a file that cannot be split (or an
    entry that does not parse alone) is parsed whole, with the whole file's error messages.
    ``cut``: the file's last cut (_cut_again), ``parsed`` what it parsed to (its entries' list
    as _compact left it); ``cuts`` gets this one. Also says, when it is so, how many entries
    at the start and at the end are the last cut's: their items are taken from ``parsed`` in
    one piece (the file's other entries only are looked at). ``memo``: the load's parsed keys
    of entries (_parse_entry), shared by every file it parses."""
    found, head, tail = _cut_again(text, cut)
    if found is None:
        return parse_yaml(text, name), None
    old_items = parsed.get("vips") if isinstance(parsed, dict) else None
    if not (head or tail) or cut is None or not isinstance(old_items, list) or len(old_items) != len(cut.entries):
        head = tail = 0
    items: list[Any] = []
    for entry in found.entries[head:len(found.entries) - tail]:
        item = previous.get(entry, _UNPARSED)
        if item is _UNPARSED and memo is not None:
            item = _parse_entry(entry, found.indent, memo)
        if item is _UNPARSED:
            try:
                doc = parse_yaml("vips:\n" + entry, name)
            except ConfigError:
                return parse_yaml(text, name), None  # raises with the line number in the file
            if not (isinstance(doc, dict) and list(doc) == ["vips"] and isinstance(doc["vips"], list)
                    and len(doc["vips"]) == 1):
                return parse_yaml(text, name), None
            item = doc["vips"][0]
        items.append(item)
    if head or tail:
        assert cut is not None and isinstance(old_items, list)
        into.update(previous)
        for entry in cut.entries[head:len(cut.entries) - tail]:
            into.pop(entry, None)  # (an entry text is one VIP's: unique in a file that loaded)
        into.update(zip(found.entries[head:len(found.entries) - tail], items))
        items = [*old_items[:head], *items, *old_items[len(old_items) - tail:]]
    else:
        into.update(zip(found.entries, items))
    if cuts is not None:
        cuts[name] = found
    return {"vips": items}, (head, tail) if head or tail else None


_UNPARSED = object()
# A key line of an entry's mapping: a plain key of letters, digits and underscores (its column
# is the mapping's, checked apart), then ": " or the end of the line.
_KEY = r"[A-Za-z_][A-Za-z0-9_]*:(?: |\n|\Z)"
# A key with a plain value of the characters of names and addresses, on one line: as YAML reads
# it when the resolver makes both strings (PyYAML's constructor then gives the scalar's text).
# (A key of at most 128 characters: YAML refuses a simple key over 1024, and no known key is long.)
_ONE_LINE = re.compile(r" *([A-Za-z_][A-Za-z0-9_]{0,127}): ([A-Za-z0-9][A-Za-z0-9._/:-]*)\n?")
_ENTRY_LINES: dict[int, tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str]]] = {}


def _entry_lines(column: int) -> tuple[re.Pattern[str], re.Pattern[str], re.Pattern[str]]:
    """For an entry's mapping at ``column``: a line left of it that is no comment; a line at
    it that is no comment; a key line at it."""
    found = _ENTRY_LINES.get(column)
    if found is None:
        found = _ENTRY_LINES[column] = (re.compile(rf"\n {{0,{column - 1}}}[^ #\n]"),
                                        re.compile(rf"\n {{{column}}}[^ #\n]"),
                                        re.compile(rf"\n(?= {{{column}}}{_KEY})"))
    return found


def _parse_entry(entry: str, indent: int, memo: dict[str, Any]) -> Any:
    """What ``parse_yaml("vips:\n" + entry)`` gives for the entry (its one item), found by
    parsing each of its keys' text once per distinct text in a load (``memo``: text -> key,
    value, depth, or None) and sharing the values: a VIP published at 300 POPs repeats the same
    2 KB flow list in every entry (section 3u of results/README.md). _UNPARSED where this cannot
    say (the caller parses the entry as before, with the same messages): anything but the plain
    shape below, any key's text that does not parse alone, a key given twice, nesting too deep.

    The plain shape: ASCII, no odd whitespace (tabs are refused by the cut), no block scalar
    (``|`` or ``>`` anywhere), the entry's first line ``- KEY: ...`` at ``indent``, and every
    other line that is no comment or blank either deeper than its keys' column
    (``indent + 2``) or a line ``KEY: ...`` at that column. The entry's mapping is then the
    keys' texts in order, each (with the dash made a space) a mapping of one key parsed alone
    by the same parser: a line at the keys' column ends any plain scalar, flow collection or
    quoted scalar that parses alone (one left open does not parse alone), so each text means in
    the entry what it means alone. The values are shared between entries: nothing changes a
    parsed tree (the loader reads it, the cache keeps tokens of it)."""
    column = indent + 2
    if ("|" in entry or ">" in entry or not entry.isascii() or any(c in entry for c in _ODD_SPACE)
            or not entry.startswith("- ", indent) or not re.match(_KEY, entry[column:])):
        return _UNPARSED
    left, at, keys = _entry_lines(column)
    text = " " * column + entry[column:]
    if left.search(text):
        return _UNPARSED
    starts = [0, *(m.start() + 1 for m in keys.finditer(text))]
    if len(starts) != 1 + sum(1 for _ in at.finditer(text)):
        return _UNPARSED  # a line at the keys' column that is no key line
    item: dict[Any, Any] = {}
    deepest = 0
    for a, b in zip(starts, [*starts[1:], len(text)]):
        block = text[a:b]
        hit = memo.get(block, _UNPARSED)
        if hit is _UNPARSED and (hit := _one_line(block)) is None:  # (not kept: a VIP's own name, address)
            hit = memo[block] = _parse_key(block)
        if hit is None or hit[0] in item:
            return _UNPARSED
        item[hit[0]] = hit[1]
        deepest = max(deepest, hit[2])
    if 2 + deepest > MAX_DEPTH:  # (the file's mapping and list, then the entry's mapping)
        return _UNPARSED
    return item


def _one_line(block: str) -> tuple[str, str, int] | None:
    """_parse_key of a key whose value is a plain string on the key's line (_ONE_LINE, both
    resolved as strings), without the parser; None for anything else."""
    m = _ONE_LINE.fullmatch(block)
    if m is None or m.group(2).endswith(":") or not plain_is_str(m.group(1)) or not plain_is_str(m.group(2)):
        return None
    return m.group(1), m.group(2), 1


def _parse_key(block: str) -> tuple[Any, Any, int] | None:
    """One key's text of an entry (_parse_entry) parsed alone: its key, its value, the depth of
    the mapping of the two; None if it does not parse alone to a mapping of one key."""
    try:
        doc = parse_yaml_first(block)
    except Exception:  # noqa: BLE001 - whatever it is, the entry's own parse decides (and words it)
        return None
    if not isinstance(doc, dict) or len(doc) != 1:
        return None
    ((key, value),) = doc.items()
    return key, value, nesting_depth(doc, MAX_DEPTH)


def read_state_dir(directory: str) -> str:
    """``state_dir`` from controller.yaml, read on its own (best effort, for starting on the
    last good desired state when the checkout does not load): the default if unreadable."""
    try:
        data = parse_yaml(read_text(os.path.join(directory, "controller.yaml"), inside=directory), "controller.yaml")
    except ConfigError:
        return DEFAULT_STATE_DIR
    value = data.get("state_dir") if isinstance(data, dict) else None
    return value if isinstance(value, str) and value else DEFAULT_STATE_DIR


def read_ha(directory: str) -> HaSettings | None:
    """``ha`` from controller.yaml, read on its own (best effort, like read_state_dir: to
    fetch the last good desired state from etcd when the checkout does not load)."""
    try:
        data = parse_yaml(read_text(os.path.join(directory, "controller.yaml")), "controller.yaml")
    except ConfigError:
        return None
    if not isinstance(data, dict) or data.get("ha") is None:
        return None
    issues = Issues()
    ha = _ha(Node(data["ha"], "ha", issues))
    return None if issues.items else ha


def load_desired(directory: str, revision: str = "", cache: LoadCache | None = None) -> DesiredState:
    """Read every file, report every error (with file and path), or return the state.

    Input that exhausts the interpreter (recursion, memory) despite the bounds in the reader
    is a rejected config too, never a dead daemon or validator."""
    try:
        return _load(directory, revision, cache)
    except (RecursionError, MemoryError) as exc:
        raise ConfigError(directory, [ConfigIssue("", f"cannot be loaded ({type(exc).__name__}): refused")]) from None


def _load(directory: str, revision: str, cache: LoadCache | None) -> DesiredState:
    issues: list[ConfigIssue] = []
    trees: dict[str, Node] = {}
    texts: dict[str, tuple[str, Any]] = {}
    vip_cache: dict[str, tuple[Any, tuple[Any, ...], FleetVip]] = {}
    names = list(FILES)
    extra_dir = os.path.join(directory, "vips")
    if os.path.isdir(extra_dir):
        names += [f"vips/{n}" for n in sorted(os.listdir(extra_dir)) if n.endswith((".yaml", ".yml"))]
    entries: dict[str, dict[str, Any]] = {}
    cuts: dict[str, _Cut] = {}
    spliced: dict[str, tuple[int, int]] = {}  # changed VIP file -> entries kept at its start and end
    unchanged: set[str] = set()  # files whose text is the cached one
    memo: dict[str, Any] = {}  # an entry's key text -> what it parses to (_parse_entry), for this load
    prefetched: dict[str, bytes] = {}
    digests_now: dict[str, bytes] = {}
    digests: dict[str, bytes] = {}  # file -> sha256 of the bytes its text is of, where known
    if cache is not None:
        prefetched, cache.prefetched = cache.prefetched, {}
        digests_now, cache.digests_now = cache.digests_now, {}
    for name in names:
        path = os.path.join(directory, name)
        try:
            seen = cache.files.get(name) if cache is not None else None
            digest = digests_now.get(path)
            if seen is not None and digest is not None and cache is not None and cache.digests.get(name) == digest:
                text = seen[0]  # (the bytes loaded last: not read, decoded nor compared)
            else:
                data_read = prefetched.get(path)
                if data_read is None:
                    digest = None  # (read now: what the fingerprint hashed is not known to be this)
                text = read_text(path, inside=directory) if data_read is None else decode_text(path, data_read)
            if digest is not None:
                digests[name] = digest
            if seen is not None and (seen[0] is text or seen[0] == text):
                data = seen[1]
                unchanged.add(name)
                if cache is not None and name in cache.entries:
                    entries[name] = cache.entries[name]
                if cache is not None and name in cache.cuts:
                    cuts[name] = cache.cuts[name]
            elif cache is not None and (name == "vips.yaml" or name.startswith("vips/")):
                entries[name] = {}
                data, splice = _parse_vips_file(text, name, cache.entries.get(name, {}), entries[name],
                                                cache.cuts.get(name), cuts, seen[1] if seen is not None else None,
                                                memo)
                if splice is not None:
                    spliced[name] = splice
            else:
                data = parse_yaml(text, name)
            texts[name] = (text, data)
            trees[name] = Node(data, "", Issues())
        except ConfigError as exc:
            issues += [ConfigIssue(f"{name}: {i.path}" if i.path else name, i.message) for i in exc.issues]
    memo.clear()  # (what it holds is in the trees now: their subtrees are held once, as _shape expects)
    if issues:
        raise ConfigError(directory, issues)
    prefixes: dict[IPNetwork, str] = {}
    file_vips: dict[str, list[FleetVip]] = {}
    by_file = cache.by_file if cache is not None else {}
    # (a file's VIPs are its entries' one for one in a load that succeeded: checked, not assumed)
    splices = {f: (*kept, hit) for f, kept in spliced.items() if (hit := by_file.get(f)) is not None
               and cache is not None and hit[0] is cache.files[f][1] and len(hit[2]) == len(hit[0]["vips"])}
    file_names: dict[str, tuple[dict[str, Any], list[FleetVip]]] = {}
    state = _build(trees, directory, revision, cache.vips if cache is not None else {}, vip_cache,
                   cache.prefixes if cache is not None and cache.vips else None, prefixes,
                   {f: hit for f, hit in by_file.items() if f in unchanged}, file_vips, splices, file_names)
    for name, node in trees.items():
        issues += [ConfigIssue(f"{name}: {i.path}" if i.path else name, i.message) for i in node.issues.items]
    if issues or state is None:
        raise ConfigError(directory, issues)
    if cache is not None:
        _compact(texts, vip_cache, entries, unchanged, spliced, cuts)
        new_by_file = {f: hit for f, hit in by_file.items() if f in unchanged and f not in file_vips}
        context = next(iter(vip_cache.values()))[1] if vip_cache else None
        for f, listed in file_vips.items():
            if f in file_names:  # spliced: the last load's by name, with the entries read again
                named, read = file_names[f]
                named.update((v.name, vip_cache[v.name]) for v in read)
            else:
                named = {v.name: vip_cache[v.name] for v in listed}
            new_by_file[f] = (texts[f][1], context, tuple(listed), named)
        cache.files, cache.vips, cache.entries, cache.prefixes = texts, vip_cache, entries, prefixes
        cache.digests = digests
        cache.by_file, cache.cuts = new_by_file, cuts
    return state


def _compact(texts: dict[str, tuple[str, Any]], vips: dict[str, tuple[Any, tuple[Any, ...], FleetVip]],
             entries: dict[str, dict[str, Any]], unchanged: Collection[str] = (),
             spliced: dict[str, tuple[int, int]] | None = None, cuts: dict[str, _Cut] | None = None) -> None:
    """Replace, in what a load caches, each VIP entry's parsed tree by a _Read token (the
    files' parsed lists too, so that nothing keeps the trees alive). ``unchanged``: files
    compacted by the load that cached them (kept as they are: LoadCache.by_file knows a file
    by its parsed value's identity); ``spliced``: files whose first and last entries (so many)
    are tokens already (_parse_vips_file): only the others (their texts from ``cuts``) are looked at."""
    shared: dict[int, tuple[Any, str]] = {}  # (_shape's, for the whole pass: VIPs share subtrees across files)
    for file, by_text in entries.items():
        if file in unchanged:
            continue
        tokens: dict[int, _Read] = {}  # id(parsed entry) -> its token
        text, data = texts[file]
        head, tail = spliced.get(file, (0, 0)) if spliced else (0, 0)
        listed = data.get("vips") if isinstance(data, dict) else None
        if (head or tail) and isinstance(listed, list) and cuts is not None and file in cuts:
            middle = listed[head:len(listed) - tail]
            cut = cuts[file].entries
            for entry in cut[head:len(cut) - tail]:
                _compact_entry(by_text, entry, vips, tokens, shared)
            texts[file] = (text, {"vips": [*listed[:head], *(tokens.get(id(x), x) for x in middle),
                                            *listed[len(listed) - tail:]]})
            continue
        for text, item in by_text.items():
            if isinstance(item, _Read):
                tokens[id(item)] = item
                continue
            name = item.get("name") if isinstance(item, dict) else None
            if not isinstance(name, str) or (hit := vips.get(name)) is None or hit[0] is not item:
                continue
            token = by_text[text] = tokens[id(item)] = _Read(text, name, _shape(item, shared))
            vips[name] = (token, hit[1], hit[2])
        text, data = texts[file]
        if isinstance(data, dict) and list(data) == ["vips"] and isinstance(data["vips"], list):
            texts[file] = (text, {"vips": [tokens.get(id(item), item) for item in data["vips"]]})


def _compact_entry(by_text: dict[str, Any], text: str, vips: dict[str, tuple[Any, tuple[Any, ...], FleetVip]],
                   tokens: dict[int, _Read], shared: dict[int, tuple[Any, str]]) -> None:
    """_compact for one entry of a file."""
    item = by_text[text]
    if isinstance(item, _Read):
        tokens[id(item)] = item
        return
    name = item.get("name") if isinstance(item, dict) else None
    if not isinstance(name, str) or (hit := vips.get(name)) is None or hit[0] is not item:
        return
    token = by_text[text] = tokens[id(item)] = _Read(text, name, _shape(item, shared))
    vips[name] = (token, hit[1], hit[2])


def _unique_vips(vips: list[FleetVip], fresh: list[FleetVip],
                 cached: dict[str, tuple[Any, tuple[Any, ...], FleetVip]],
                 kept: dict[str, tuple[Any, tuple[Any, ...], FleetVip]],
                 prefixes: dict[IPNetwork, str] | None) -> dict[IPNetwork, str] | None:
    """Address -> VIP of ``vips`` if their names and addresses are unique, found from the last
    load's (``cached``: its VIPs; ``prefixes``: its address -> VIP) by looking at the VIPs it
    did not have only (``fresh``: those of ``vips`` that are not its very objects; ``kept``:
    ``vips`` by name, as the load caches them): the VIPs kept from it were unique among
    themselves. None if there is a duplicate, or nothing to start from (the caller then walks
    them all, as its messages say). O(VIPs changed): an address's hash is ~1 us of Python,
    and a one-file commit of 10,000 VIPs walked them all twice (~15-25 ms)."""
    if prefixes is None or not cached:
        return None
    if len(kept) != len(vips):  # (kept is by name: a name listed twice)
        return None
    owners = dict(prefixes)  # (a copy keeps the hashes: no address is hashed again)
    gone = [cached[name][2] for name in cached.keys() - kept.keys()]
    for was in [*gone, *(hit[2] for v in fresh if (hit := cached.get(v.vip.name)) is not None)]:
        if owners.get(was.vip.prefix) == was.vip.name:
            del owners[was.vip.prefix]  # changed or removed: its address is free
    for v in fresh:
        if v.vip.prefix in owners:
            return None
        owners[v.vip.prefix] = v.vip.name
    return owners


def _build(trees: dict[str, Node], directory: str, revision: str,
           cached: dict[str, tuple[Any, tuple[Any, ...], FleetVip]],
           to_cache: dict[str, tuple[Any, tuple[Any, ...], FleetVip]],
           prefixes: dict[IPNetwork, str] | None = None,
           to_prefixes: dict[IPNetwork, str] | None = None,
           files_kept: dict[str, tuple[Any, Any, tuple[FleetVip, ...],
                                       dict[str, tuple[Any, tuple[Any, ...], FleetVip]]]] | None = None,
           file_vips: dict[str, list[FleetVip]] | None = None,
           splices: dict[str, tuple[int, int, tuple[Any, Any, tuple[FleetVip, ...],
                                                    dict[str, tuple[Any, tuple[Any, ...], FleetVip]]]]] | None = None,
           file_names: dict[str, tuple[dict[str, Any], list[FleetVip]]] | None = None) -> DesiredState | None:
    """The desired state of the parsed ``trees``, or None if a file's shape is wrong (the
    issues are on the trees' nodes). ``cached``: the last load's VIPs by name (reused while
    their entry and context are unchanged), ``to_cache`` gets this load's; ``files_kept``: the
    last load's LoadCache.by_file of the files whose text is unchanged (their VIPs taken in one
    piece while their context is the same), ``file_vips`` gets the VIPs of each file read.
    ``splices``: changed files whose first ``head`` and last ``tail`` entries are the last
    load's tokens (_parse_vips_file), with the file's LoadCache.by_file of the last load: while
    the context is the same, those entries' VIPs are the last load's, taken in one piece (a
    one-VIP commit to a 10,000-VIP file walked them all: ~15-40 ms), only the others are read;
    ``file_names`` gets, for each file so read, its VIPs by name as the load caches them
    (``to_cache``'s entries) and the VIPs read (their entries change when _compact runs)."""
    top = trees["controller.yaml"]
    if not top.is_mapping():
        return None
    listen = top.opt("listen", read_host_port, ("0.0.0.0", 9800))
    metrics_listen = top.opt("metrics_listen", read_host_port, None)
    state_dir = top.opt("state_dir", Node.as_str, DEFAULT_STATE_DIR)
    operator = top.opt("operator_token_sha256", _sha256, None)
    allowed = tuple(p for n in _list(top, "allowed_prefixes", True) if (p := n.as_network()) is not None)
    refuse_empty(top, "allowed_prefixes")
    policy = read_policy(top.get("policy"), Policy())
    change = _section(top, "change", _change, ChangePolicy())
    defaults = read_check_defaults(top.get("check_defaults"))
    attrs = read_state_attributes(top.get("attributes"), StateAttributes(DEFAULT_UP, DEFAULT_DRAINING))
    dials_node = top.get("dials")
    api = top.opt("api", _api, ApiSettings())
    if isinstance(listen, tuple) and (refusal := plain_http_refusal(api, listen[0])) is not None:
        top.issues.add("api.tls", refusal)  # (the daemon asks again of a --listen given on its command line)
    ha = _ha(top.get("ha"))
    top.reject_unknown()

    pops_root = trees["pops.yaml"]
    pops: list[PopSpec] = []
    if pops_root.is_mapping():
        for n in _list(pops_root, "pops", True):
            if (spec := _pop(n)) is not None:
                pops.append(spec)
        pops_root.reject_unknown()
        _unique(pops_root, "pops", [spec.name for spec in pops], "POP")
        _separate_tokens(top, pops_root, operator)
    pop_names = {p.name for p in pops}

    vips: list[FleetVip] = []
    vip_attrs = attrs or StateAttributes(DEFAULT_UP, DEFAULT_DRAINING)
    # Everything a VIP's reading depends on besides its own definition.
    context = (allowed, tuple(sorted(defaults.items())), vip_attrs, policy, frozenset(pop_names))
    previous_context = next(iter(cached.values()))[1] if cached else None
    if previous_context == context:
        context = previous_context  # compared once here, then by identity for each VIP
    fresh: list[FleetVip] = []  # the VIPs that are not the last load's objects
    for file, root in trees.items():
        if file not in ("vips.yaml",) and not file.startswith("vips/"):
            continue
        kept = files_kept.get(file) if files_kept is not None else None
        if kept is not None and kept[0] is root.value and kept[1] is context:
            vips += kept[2]  # the same text and context: the same VIPs (read without error last time)
            to_cache.update(kept[3])
            continue
        if not root.is_mapping():
            continue
        first = len(vips)
        listed = root.get("vips", required=file == "vips.yaml")
        raws = listed.value if listed is not None and isinstance(listed.value, list) else []
        splice = splices.get(file) if splices is not None else None
        head = tail = 0
        dest = to_cache
        if splice is not None and splice[2][1] is context and len(raws) >= splice[0] + splice[1]:
            head, tail, (_, _, was, named) = splice
            dest = dict(named)
            for gone in was[head:len(was) - tail]:
                dest.pop(gone.name, None)  # (names are unique in a load that succeeded)
            vips += was[:head]
        read_here: list[FleetVip] = []
        for i, raw in enumerate(raws[head:len(raws) - tail], head):
            if isinstance(raw, _Read) and (hit := cached.get(raw.name)) is not None and hit[0] is raw and (
                    hit[1] is context):
                # The entry's text is unchanged (its token is the one the cache holds) and so is
                # its context: its VIP as read last time, with no node made for it (a reload of a
                # 10,000-VIP file after a one-line commit spent ~0.1 s on those).
                vips.append(hit[2])
                dest[raw.name] = hit
                continue
            assert listed is not None
            n = listed._child(raw, i)
            name = raw.name if isinstance(raw, _Read) else raw.get("name") if isinstance(raw, dict) else None
            hit = cached.get(name) if isinstance(name, str) else None
            key = raw  # what the cache knows this entry by (a _Read token: its text)
            if hit is not None and (hit[1] is context or hit[1] == context) and (
                    hit[0] is raw or hit[0] == raw
                    or isinstance(hit[0], _Read) and isinstance(raw, dict) and hit[0].shape == _shape(raw)):
                v: FleetVip | None = hit[2]  # read without error last time, same input
            else:
                if isinstance(raw, _Read):  # its context changed: read its text again
                    raw = parse_yaml("vips:\n" + raw.text, file)["vips"][0]
                    n = Node(raw, n.path, n.issues)
                v = _fleet_vip(n, allowed, defaults, vip_attrs, policy, pop_names)
            if v is not None:
                vips.append(v)
                dest[v.name] = (key, context, v)
                read_here.append(v)
                if hit is None or hit[2] is not v:
                    fresh.append(v)
        if head or tail:
            assert splice is not None
            was = splice[2][2]
            vips += was[len(was) - tail:]
            to_cache.update(dest)
            if file_names is not None:
                file_names[file] = (dest, read_here)
        if listed is not None and not isinstance(listed.value, list):
            list(listed.items())  # (what a list's reader says of anything else)
        root.reject_unknown()
        if file_vips is not None:
            file_vips[file] = vips[first:]
    owners = _unique_vips(vips, fresh, cached, to_cache, prefixes)
    if owners is None:  # a duplicate (or no previous load to start from): every VIP, in order
        seen_names: dict[str, int] = {}
        seen_prefixes: dict[IPNetwork, str] = {}
        for v in vips:
            if v.name in seen_names or v.vip.prefix in seen_prefixes:
                what = f"VIP name {v.name}" if v.name in seen_names else f"VIP address {v.vip.prefix}"
                trees["vips.yaml"].issues.add("vips", f"duplicate {what}")
            seen_names[v.name] = 1
            seen_prefixes[v.vip.prefix] = v.name
        owners = seen_prefixes
    if to_prefixes is not None:
        to_prefixes.update(owners)
    # (the regions only where there are dials: a walk of every VIP's origins on every reload)
    dials = read_dials(dials_node, {o.region for v in vips for o in v.vip.origins} if dials_node is not None else set())
    if attrs is None:
        return None
    for i, name in enumerate(change.order):
        if name not in pop_names:
            top.issues.add(f"change.rollout.order[{i}]", f"unknown POP {name!r}")
    state = DesiredState(revision, directory, listen, metrics_listen, state_dir, operator, allowed,
                         tuple(pops), tuple(vips), policy, change, api, ha, dials=dials)
    # Without config dials with_dials has nothing to do: every VIP here is _fleet_vip's (its
    # dials empty) or the last load's cached one, which is that same object, never the copy
    # with_dials made (its any() walk of 10,000 VIPs was ~1-2 ms of every reload).
    return with_dials(state, {}) if dials else state


def _ha(node: Node | None) -> HaSettings | None:
    """``ha:``: the store (file | etcd) and, for etcd, its endpoints, lease and TLS."""
    if node is None or not node.is_mapping():
        return None
    kind = node.opt("store", lambda n: n.as_choice(tuple(StoreKind)), StoreKind.FILE.value)
    endpoints = tuple(e for n in _list(node, "endpoints", kind == StoreKind.ETCD) if (e := _etcd_url(n)))
    prefix = node.opt("prefix", Node.as_str, "/anycast/")
    if not prefix.startswith("/") or not prefix.endswith("/"):
        node.error(f"must start and end with '/', got {prefix!r}", "prefix")
    # etcd's own minimum lease is about 1.5 x its election timeout (1 s by default).
    ttl = node.opt("lease_ttl", lambda n: n.as_int(2, 300), 5)
    timeout = node.opt("request_timeout", lambda n: n.as_float(0.05, 30), 1.0)
    tls = node.get("tls")
    files: dict[str, str | None] = {"ca_file": None, "cert_file": None, "key_file": None}
    if tls is not None and tls.is_mapping():
        for key in files:
            files[key] = tls.opt(key, Node.as_str, None)
        tls.reject_unknown()
        if (files["cert_file"] is None) != (files["key_file"] is None):
            tls.error("cert_file and key_file go together")
    node.reject_unknown()
    if kind == StoreKind.ETCD and tls is not None and any(not e.startswith("https://") for e in endpoints):
        node.error("tls is set: every endpoint must be https://", "endpoints")
    return HaSettings(StoreKind(kind), endpoints, prefix, ttl, timeout, files["ca_file"], files["cert_file"],
                      files["key_file"])


def _etcd_url(node: Node) -> str | None:
    s = node.as_str()
    if s is not None and not re.match(r"^https?://(\[[0-9a-fA-F:.]+\]|[^/\s:\[\]]+):\d+/?$", s):
        node.error(f"expected http(s)://HOST:PORT (an etcd client URL), got {s!r}")
        return None
    return s.rstrip("/") if s else None


def _list(node: Node, key: str, required: bool) -> list[Node]:
    child = node.get(key, required=required)
    return [] if child is None else list(child.items())


def _unique(root: Node, key: str, values: list[str], what: str) -> None:
    for i, value in enumerate(values):
        if value in values[:i]:
            root.issues.add(f"{key}[{i}]", f"duplicate {what} {value!r}")


def _api(node: Node) -> ApiSettings | None:
    if not node.is_mapping():
        return None
    d = ApiSettings()
    settings = ApiSettings(
        header_timeout=node.opt("header_timeout", lambda n: n.as_float(0.5, 300), d.header_timeout),
        body_timeout=node.opt("body_timeout", lambda n: n.as_float(0.5, 600), d.body_timeout),
        max_unauthenticated_connections=node.opt("max_unauthenticated_connections",
                                                 lambda n: n.as_int(4, 100_000), d.max_unauthenticated_connections),
        tls=node.opt("tls", _tls, None),
        signing_key=node.opt("signing_key", read_absolute_path, None),
        insecure_plain_http=node.opt("insecure_plain_http", Node.as_bool, False),
    )
    node.reject_unknown()
    if settings.insecure_plain_http and node.has("tls"):
        node.error("api.tls is set: remove insecure_plain_http (HTTPS is served)", "insecure_plain_http")
    return settings


def _tls(node: Node) -> TlsSettings | None:
    if not node.is_mapping():
        return None
    cert, key = node.req("cert", read_absolute_path), node.req("key", read_absolute_path)
    client_ca = node.opt("client_ca", read_absolute_path, None)
    node.reject_unknown()
    return TlsSettings(cert, key, client_ca) if cert and key else None


def _separate_tokens(top: Node, pops_root: Node, operator: str | None) -> None:
    """Each POP's token and the operator's must differ: a shared hash would let one POP's
    agent read another's plans, or (shared with the operator) drain every POP."""
    owner: dict[str, str] = {}
    for i, n in enumerate(_list(pops_root, "pops", False)):
        raw = n.value if isinstance(n.value, dict) else {}
        token, name = raw.get("token_sha256"), raw.get("name")
        if not isinstance(token, str):
            continue
        if token in owner:
            pops_root.issues.add(f"pops[{i}].token_sha256", f"the same token hash as POP {owner[token]!r}: "
                                                             "every POP needs a token of its own")
        else:
            owner[token] = str(name)
    if operator is not None and operator in owner:
        top.error(f"the same hash as POP {owner[operator]!r}'s token_sha256 in pops.yaml: the operator "
                  "token must differ from every agent token", "operator_token_sha256")


def _sha256(node: Node) -> str | None:
    s = node.as_str()
    if s is not None and not _SHA256.match(s):
        node.error("expected 64 lowercase hex digits (sha256sum of the token), not the token itself")
        return None
    return s


def _pop(node: Node) -> PopSpec | None:
    if not node.is_mapping():
        return None
    name = node.req("name", read_name)
    token = node.req("token_sha256", _sha256)
    description = node.opt("description", Node.as_str, "")
    node.reject_unknown()
    if name is None or token is None:
        return None
    return PopSpec(name, token, description)


# Publish lists, one object per distinct list (most VIPs share a few), of interned POP names:
# YAML makes a new string for every scalar, so 10,000 VIPs x 50 POPs kept 500,000 copies of
# 50 names (~26 MB) and 10,000 equal tuples. Bounded, not a cache policy: lists are few.
_PUBLISH: dict[tuple[str, ...], tuple[str, ...]] = {}


def _shared_publish(publish: tuple[str, ...]) -> tuple[str, ...]:
    shared = _PUBLISH.get(publish)
    if shared is None:
        if len(_PUBLISH) > 10_000:
            _PUBLISH.clear()
        shared = _PUBLISH[publish] = tuple(sys.intern(name) for name in publish)
    return shared


def _fleet_vip(node: Node, allowed: tuple[IPNetwork, ...], defaults: dict[str, float | int],
               attrs: StateAttributes, policy: Policy, pop_names: set[str]) -> FleetVip | None:
    if not node.is_mapping():
        return None
    # Controller-only keys first: read_vip() rejects the keys nobody asked for.
    publish: list[str] = []
    publish_node = node.get("publish", required=True)
    raw = publish_node.value if publish_node is not None else None
    if (isinstance(raw, list) and raw and all(type(name) is str for name in raw)
            and len(names := set(raw)) == len(raw) and names <= pop_names):
        # The usual list (known POPs, each once): taken whole, not name by name (300 POPs x
        # 100,000 VIPs: 30 million Node items and a list search each).
        publish = list(raw)
    elif publish_node is not None:
        for item in publish_node.items():
            name = item.as_str()
            if name is not None and name not in pop_names:
                item.error(f"unknown POP {name!r} (pops.yaml lists: {', '.join(sorted(pop_names))})")
            elif name is not None and name in publish:
                item.error(f"POP {name!r} listed twice")
            elif name is not None:
                publish.append(name)
        if isinstance(publish_node.value, list) and not publish_node.value:
            publish_node.error("at least one POP is needed (or set enabled: false)")
    enabled = node.opt("enabled", Node.as_bool, True)
    vip_policy = read_policy(node.get("policy"), policy)
    steering_node = node.get("steering")
    vip = read_vip(node, allowed, defaults, attrs)
    if vip is None or not publish:
        return None
    steering = read_steering(steering_node, {o.region for o in vip.origins}, [o.region for o in vip.origins],
                             pop_names, publish)
    return FleetVip(vip, _shared_publish(tuple(publish)), enabled, vip_policy, steering)


def read_steering(node: Node | None, regions: set[str], order: list[str], pop_names: set[str],
                  publish: list[str]) -> Steering:
    """A VIP's ``steering``: per-POP origin preference and origin weights (README: Traffic
    steering). Every error names its path; with any error the VIP is refused whole."""
    if node is None or not node.is_mapping():
        return NO_STEERING
    weights = _weights(node.get("weights"), regions) or ()
    preferences: list[Preference] = []
    claimed: dict[str, int] = {}
    for i, p in enumerate(_list(node, "preference", False)):
        if not p.is_mapping():
            continue
        pops: list[str] = []
        for item in _list(p, "pops", True):
            name = item.as_str()
            if name is None:
                continue
            if name not in pop_names:
                item.error(f"unknown POP {name!r} (pops.yaml lists: {', '.join(sorted(pop_names))})")
            elif name not in publish:
                item.error(f"POP {name!r} is not one of this VIP's publish domains ({', '.join(publish)})")
            elif name in claimed:
                item.error(f"POP {name!r} already has a preference (steering.preference[{claimed[name]}])")
            else:
                claimed[name] = i
                pops.append(name)
        listed: list[str] = []
        for item in _list(p, "origins", True):
            region = item.as_str()
            if region is None:
                continue
            if region not in regions:
                item.error(f"unknown origin region {region!r} (this VIP's regions: {', '.join(order)})")
            elif region in listed:
                item.error(f"origin region {region!r} listed twice")
            else:
                listed.append(region)
        own = _weights(p.get("weights"), regions)
        p.reject_unknown()
        if pops and listed:
            preferences.append(Preference(tuple(pops), tuple(listed) + tuple(r for r in order if r not in listed),
                                          own))
    node.reject_unknown()
    return Steering(tuple(preferences), weights)


def _weights(node: Node | None, regions: set[str]) -> tuple[tuple[str, int], ...] | None:
    """``{region: 0-255}``; at least one above 0. None if absent (or wrong)."""
    if node is None or not node.is_mapping():
        return None
    out: list[tuple[str, int]] = []
    for region in node.value:
        w = node.get(str(region))
        if region not in regions:
            node.error(f"unknown origin region {region!r} (this VIP's regions: {', '.join(sorted(regions))})",
                       str(region))
        elif w is not None and (value := w.as_int(0, MAX_WEIGHT)) is not None:
            out.append((str(region), value))
    if out and not any(w for _, w in out):
        node.error("every weight is 0: at least one origin needs a weight above 0 (or leave weights out)")
        return None
    return tuple(out) if out else None


def read_dials(node: Node | None, regions: set[str]) -> tuple[tuple[str, int], ...]:
    """controller.yaml ``dials``: ``{region: 0-100}`` (100 is the default and left out)."""
    if node is None or not node.is_mapping():
        return ()
    out: list[tuple[str, int]] = []
    for region in node.value:
        d = node.get(str(region))
        if region not in regions:
            node.error(f"unknown origin region {region!r} (no VIP has it)", str(region))
        elif d is not None and (pct := d.as_int(0, FULL_DIAL)) is not None and pct != FULL_DIAL:
            out.append((str(region), pct))
    return tuple(sorted(out))


def read_policy(node: Node | None, base: Policy) -> Policy:
    """Policy knobs; a VIP's ``policy`` overrides the global one key by key."""
    if node is None or not node.is_mapping():
        return base
    f, s, d, m = base.failover, base.safety, base.drain, base.dampening
    failover = _section(node, "failover", lambda n: FailoverPolicy(
        quorum=n.opt("quorum", lambda x: x.as_float(0.01, 1.0), f.quorum),
        min_reporting_pops=n.opt("min_reporting_pops", lambda x: x.as_int(1, 1000), f.min_reporting_pops),
        failback_hold_down=n.opt("failback_hold_down", lambda x: x.as_float(0, 86400), f.failback_hold_down),
        min_down_pops=n.opt("min_down_pops", lambda x: x.as_int(1, 1000), f.min_down_pops),
    ), f)
    safety = _section(node, "safety", lambda n: _safety(n, s), s)
    drain = _section(node, "drain", lambda n: DrainPolicy(
        drain_time=n.opt("drain_time", lambda x: x.as_float(0, 86400), d.drain_time)), d)
    dampening = _section(node, "dampening", lambda n: _dampening(n, m), m)
    node.reject_unknown()
    return Policy(failover, safety, drain, dampening)


def _dampening(n: Node, m: DampeningPolicy) -> DampeningPolicy:
    d = DampeningPolicy(
        flaps=n.opt("flaps", lambda x: x.as_int(2, 1000), m.flaps),
        window=n.opt("window", lambda x: x.as_float(1, 86400), m.window),
        hold_down=n.opt("hold_down", lambda x: x.as_float(0, 86400), m.hold_down),
        max_hold_down=n.opt("max_hold_down", lambda x: x.as_float(0, 86400 * 7), m.max_hold_down),
    )
    if d.hold_down > d.max_hold_down:
        n.error(f"{d.hold_down:g} is above max_hold_down {d.max_hold_down:g}", "hold_down")
        return m
    return d


def _safety(n: Node, s: SafetyPolicy) -> SafetyPolicy:
    rate_max, rate_window = s.withdraw_rate_max, s.withdraw_rate_window
    rate = n.get("withdraw_rate")
    if rate is not None and rate.is_mapping():
        rate_max = rate.opt("max", lambda x: x.as_int(1, 100000), rate_max)
        rate_window = rate.opt("window", lambda x: x.as_float(1, 86400), rate_window)
        rate.reject_unknown()
    return SafetyPolicy(
        max_withdraw_fraction=n.opt("max_withdraw_fraction", lambda x: x.as_float(0.0, 1.0), s.max_withdraw_fraction),
        min_announcing_pops=n.opt("min_announcing_pops", lambda x: x.as_int(0, 1000), s.min_announcing_pops),
        withdraw_rate_max=rate_max, withdraw_rate_window=rate_window,
        report_stale_after=n.opt("report_stale_after", lambda x: x.as_float(1, 3600), s.report_stale_after),
        settle=n.opt("settle", lambda x: x.as_float(0, 60), s.settle),
        settle_on_evidence=n.opt("settle_on_evidence", Node.as_bool, s.settle_on_evidence),
    )


def _change(n: Node) -> ChangePolicy:
    d = ChangePolicy()
    bake, first, fraction, order = d.bake, d.first_wave, d.wave_fraction, d.order
    rollout = n.get("rollout")
    if rollout is not None and rollout.is_mapping():
        bake = rollout.opt("bake", lambda x: x.as_float(0, 86400), bake)
        first = rollout.opt("first_wave", lambda x: x.as_int(1, 1000), first)
        fraction = rollout.opt("wave_fraction", lambda x: x.as_float(0.01, 1.0), fraction)
        order_node = rollout.get("order")
        if order_node is not None:
            order = tuple(s for item in order_node.items() if (s := item.as_str()) is not None)
        rollout.reject_unknown()
    return ChangePolicy(
        max_withdraw_fraction=n.opt("max_withdraw_fraction", lambda x: x.as_float(0.0, 1.0), d.max_withdraw_fraction),
        max_removed_vips=n.opt("max_removed_vips", lambda x: x.as_int(0, 1000000), d.max_removed_vips),
        bake=bake, first_wave=first, wave_fraction=fraction, order=order)


def _section(node: Node, key: str, read: Callable[[Node], T], default: T) -> T:
    child = node.get(key)
    if child is None or not child.is_mapping():
        return default
    value = read(child)
    child.reject_unknown()
    return value
