"""Linux inotify on a file descriptor the event loop waits on: no wake-up while nothing changes.

The watcher (server/daemon.py, ``Watcher._inotify``) used watchfiles' ``awatch``: its Rust
loop sleeps ``step`` (10 ms) and takes the GIL after each sleep to look for changes, so an
idle controller woke 100 times a second for it (~0.27 % of a core at 10,000 VIPs, results
3ad). Here the kernel's queue is read when the loop's selector says the descriptor is
readable: nothing runs between changes. Directory trees are watched recursively by hand
(a watch per directory; a directory created or moved in is watched at once and the files
already in it are reported as added; a symlinked directory is followed, as the loader
follows it: its target watched, its events named by the link's path); a queue overflow is
reported as such (the watcher then looks at everything) and the trees added again (a
directory made while events were dropped is watched); a watched root deleted or moved away
(the config directory replaced) is reported the same way, the old watches dropped, and the
path watched again if it is there, else named in ``lost`` (the watcher waits for it). OSError when inotify cannot start (no instances or watches left,
no inotify): the watcher falls back to stat polling.

Why not a library (our rule: a well-kept library where it does the job better). watchfiles
polls (above); we keep no dependency on it (``Change`` below is ours). asyncinotify (pure
ctypes, no dependencies; 4.4.4 read, the latest release in 2026-04) reads on the loop's
readiness (``add_reader``), shows ``Q_OVERFLOW`` as an event, and is typed, but: in 4.4.4
``InitFlags.NONBLOCK`` is ``getattr(os, 'O_CLOEXEC', 0)`` (the wrong constant: an alias of
CLOEXEC), so its default descriptor blocks, and draining the queue to empty, as ``read()``
does, would block the event loop (health, BGP, the API) until the next change; where the C
library has no inotify it raises RuntimeError at import, not when started; a directory
moved inside the tree keeps its old ``Watch.path`` (the same wd comes back from
``add_watch`` with the first path); and its recursion (``RecursiveInotify``) neither prunes
nor reports the files put in a new directory before its watch. Using it would replace the
~40 lines below that load libc and unpack ``struct inotify_event`` with workarounds for
those, a pin, and an MPL-2.0 dependency: not better, so the syscalls stay here.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import enum
import errno
import os
import struct
from collections.abc import Callable, Iterator

IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_MOVED_FROM = 0x040
IN_MOVED_TO = 0x080
IN_CREATE = 0x100
IN_DELETE = 0x200
IN_DELETE_SELF = 0x400
IN_MOVE_SELF = 0x800
IN_Q_OVERFLOW = 0x4000
IN_IGNORED = 0x8000
IN_ONLYDIR = 0x01000000
IN_MASK_ADD = 0x20000000
IN_ISDIR = 0x40000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
MASK = (IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_MOVED_FROM | IN_MOVED_TO | IN_CREATE | IN_DELETE
        | IN_DELETE_SELF | IN_MOVE_SELF)
LINK_MASK = IN_CREATE | IN_MOVED_TO | IN_DELETE | IN_MOVED_FROM  # (a link's directory: its entries only)
_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len (then the name)


class Change(enum.Enum):
    """What happened to a path (the watcher's filter, ``daemon._Relevant``, reads it)."""

    added = "added"  # created or moved in (a directory: and each file already in it)
    modified = "modified"  # written, closed after writing, or its metadata changed
    deleted = "deleted"  # deleted or moved out (a watched directory: itself)


OVERFLOW = (Change.modified, "")  # the kernel dropped events: look at everything


def _libc() -> ctypes.CDLL:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.inotify_init1  # noqa: B018 - (AttributeError where the C library has none)
    except (OSError, AttributeError) as exc:
        raise OSError(errno.ENOSYS, f"no inotify in the C library ({exc})") from None
    return libc


class Inotify:
    """One inotify instance (``fd``, non-blocking). ``add(path, recursive, prune)`` watches a
    directory (and, ``recursive``, the directories under it, except those ``prune`` refuses);
    ``read()`` returns what changed since the last read: (Change, path) pairs, or
    OVERFLOW among them. ``close()`` frees it."""

    def __init__(self) -> None:
        self._c = _libc()
        fd = self._c.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"inotify_init1: {os.strerror(e)}")
        self.fd: int = fd
        self._dirs: dict[int, tuple[str, bool, Callable[[str], bool] | None]] = {}  # wd -> (path, recursive, prune)
        self._ids: dict[int, tuple[int, int]] = {}  # wd -> (st_dev, st_ino) of the directory its path led to
        # wd -> (directory, names): the directories of symlinks watched for (add_links), the
        # links' names there; one re-pointed, removed or made sets ``repointed``
        self._links: dict[int, tuple[str, set[str]]] = {}
        self.repointed = False
        self._roots: list[tuple[str, bool, Callable[[str], bool] | None]] = []  # what add() was asked to watch
        self.lost: set[str] = set()  # roots gone (deleted or moved away) and not there again: not watched

    def add(self, path: str, recursive: bool = True, prune: Callable[[str], bool] | None = None) -> list[str]:
        """Watch the directory ``path`` (and its subdirectories if ``recursive``, but not those
        for which ``prune(path)`` is true; a symlinked directory is followed, its target watched
        and its events named by the link's path); the files found in the directories newly
        watched (for a directory that appeared: what was put in it before its watch)."""
        self._roots.append((path, recursive, prune))  # (before the walk: what it may follow links into)
        try:
            return self._add(path, recursive, prune)
        except BaseException:
            self._roots.pop()
            raise

    def _add(self, path: str, recursive: bool, prune: Callable[[str], bool] | None) -> list[str]:
        files: list[str] = []
        stack = [path]
        seen: set[str] = set()  # (the real paths of this walk: a link back up the tree is not followed round)
        # A symlinked directory is followed only where it stays inside a tree watched (the
        # loader's rule: a link out of the config directory is refused): a committed `x -> /`
        # must not walk and watch the machine's file system on the event loop.
        tops = [os.path.realpath(r) for r, _, _ in self._roots]
        while stack:
            d = stack.pop()
            real = os.path.realpath(d)
            if real in seen or not any(real == t or real.startswith(t.rstrip(os.sep) + os.sep) for t in tops):
                continue
            seen.add(real)
            wd = self._c.inotify_add_watch(self.fd, os.fsencode(real), MASK | IN_ONLYDIR)
            if wd < 0:
                e = ctypes.get_errno()
                if e in (errno.ENOENT, errno.ENOTDIR) and d != path:
                    continue  # (gone meanwhile)
                raise OSError(e, f"inotify_add_watch {d}: {os.strerror(e)}")
            known = self._dirs.get(wd)
            if known is not None and known[0] != d and os.path.realpath(known[0]) == real:
                continue  # (watched already under another path that still leads to it: one name per watch)
            self._dirs[wd] = (d, recursive, prune)
            try:
                st = os.stat(real)
                self._ids[wd] = (st.st_dev, st.st_ino)
                entries = list(os.scandir(d))
            except OSError:
                continue
            for entry in entries:
                try:
                    is_dir = entry.is_dir()  # (a symlinked directory too: the loader follows it)
                except OSError:
                    continue
                if not is_dir:
                    files.append(entry.path)
                elif recursive and not (prune is not None and prune(entry.path)):
                    stack.append(entry.path)
        return files

    def add_links(self, path: str) -> None:
        """Watch the directory of ``path`` if ``path`` is a symlink (and so on along a chain of
        links: ``/etc/anycast -> /srv/current -> release-7``), for the link's own entry there:
        a link re-pointed (``ln -sfn``, a rename over it), removed or made sets ``repointed``
        (the caller watches ``path`` anew: the tree watched is where the link led before)."""
        seen: set[str] = set()
        while os.path.islink(path) and path not in seen:
            seen.add(path)
            parent, name = os.path.split(os.path.abspath(path))
            wd = self._c.inotify_add_watch(self.fd, os.fsencode(parent), LINK_MASK | IN_ONLYDIR | IN_MASK_ADD)
            if wd < 0:
                e = ctypes.get_errno()
                raise OSError(e, f"inotify_add_watch {parent}: {os.strerror(e)}")
            self._links.setdefault(wd, (parent, set()))[1].add(name)
            path = os.path.join(parent, os.readlink(path))

    def read(self) -> list[tuple[Change, str]]:
        """The changes queued (none if nothing is: the descriptor is non-blocking). After an
        overflow the trees are added again (a directory made meanwhile is watched). A root
        directory deleted or moved away is reported (OVERFLOW: look at everything), the
        watches of what moved dropped, and the path watched again if it is there, else
        named in ``lost``."""
        out: list[tuple[Change, str]] = []
        overflowed = False
        gone: list[str] = []
        roots = {r for r, _, _ in self._roots}
        names: set[str] | None = None  # the paths watched (_drop_stale's), made when first needed
        dropped_any = False  # a watch dropped as stale: the trees walked again (below)
        for wd, mask, name in self._events():
            if mask & IN_Q_OVERFLOW:
                overflowed = True
                continue
            if mask & IN_IGNORED:
                if self._links.pop(wd, None) is not None:
                    self.repointed = True  # (a link's directory gone: so is the link)
                self._ids.pop(wd, None)
                names = None
                dropped = self._dirs.pop(wd, None)
                if dropped is not None and dropped[0] in roots and dropped[0] not in gone:
                    gone.append(dropped[0])
                continue
            link = self._links.get(wd)
            if link is not None and name in link[1]:
                self.repointed = True
            watched = self._dirs.get(wd)
            if watched is None:
                continue
            d, recursive, prune = watched
            path = os.path.join(d, name) if name else d
            if name and mask & (IN_DELETE | IN_MOVED_FROM | IN_CREATE | IN_MOVED_TO):
                if names is None:
                    names = {p for p, _, _ in self._dirs.values()}
                if path in names:  # (a file's entry: never; a directory's or a symlink's watched)
                    dropped_any |= self._drop_stale(path, roots)  # (a symlink removed or re-pointed: its old target's watches)
                    names = None
            if mask & (IN_DELETE_SELF | IN_MOVE_SELF) and not name and d in roots:
                out.append((Change.deleted, d))
                if d not in gone:
                    gone.append(d)
            elif mask & (IN_DELETE | IN_MOVED_FROM | IN_DELETE_SELF | IN_MOVE_SELF):
                out.append((Change.deleted, path))
            elif mask & (IN_CREATE | IN_MOVED_TO):
                out.append((Change.added, path))
                if ((mask & IN_ISDIR or os.path.islink(path) and os.path.isdir(path))
                        and recursive and not (prune is not None and prune(path))):
                    names = None
                    try:
                        out.extend((Change.added, f) for f in self._add(path, True, prune))
                    except OSError as exc:
                        if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                            out.append(OVERFLOW)  # (out of watches: what it holds is looked at, not watched)
            else:
                out.append((Change.modified, path))
        for root in gone:
            self._reestablish(root)
        if dropped_any and not overflowed:
            # A watch is one per directory, named by the first path that led to it: dropped
            # with a link that had its name (``b0 -> a`` removed or re-pointed), the real
            # directory ``a`` lost its watch with it. The trees are walked again (each watch
            # once more under a path that leads to it); one watched anew is looked at.
            before = set(self._dirs)
            for root, recursive, prune in self._roots:
                try:
                    self._add(root, recursive, prune)
                except OSError:
                    self._reestablish(root)
            if set(self._dirs) - before:
                overflowed = True  # (what it holds: looked at; the walk again below is a no-op)
        if overflowed:
            for root, recursive, prune in self._roots:
                try:
                    self._add(root, recursive, prune)
                except OSError:
                    self._reestablish(root)
        if overflowed or gone or self.repointed:
            out.append(OVERFLOW)
        return out

    def _drop_stale(self, path: str, roots: set[str]) -> bool:
        """Drop the watches named at or under ``path`` (an entry removed, moved, made or renamed
        over) that their names no longer lead to: a symlinked directory's target stays there
        when the link is removed or re-pointed, and its writes were reported as the link's
        (extra looks for good). A real directory moved away likewise; one moved within the tree
        is watched again under its new name (its IN_MOVED_TO). The roots are add()'s business."""
        under = path + os.sep
        stale = []
        for wd, (p, _, _) in self._dirs.items():
            if (p == path or p.startswith(under)) and p not in roots:
                try:
                    st = os.stat(p)
                    if (st.st_dev, st.st_ino) == self._ids.get(wd) and os.path.isdir(p):
                        continue
                except OSError:
                    pass
                stale.append(wd)
        for wd in stale:
            del self._dirs[wd]
            self._ids.pop(wd, None)
            if wd not in self._links:
                self._c.inotify_rm_watch(self.fd, wd)  # (EINVAL for one already gone: nothing to do)
        return bool(stale)

    def _reestablish(self, root: str) -> None:
        """Drop the watches at and under ``root`` (gone, or moved elsewhere: its events would be
        named by the old path), then watch the roots there again if they are there."""
        under = root + os.sep
        for wd, (p, _, _) in list(self._dirs.items()):
            if p == root or p.startswith(under):
                self._c.inotify_rm_watch(self.fd, wd)  # (EINVAL for one already gone: nothing to do)
                del self._dirs[wd]
                self._ids.pop(wd, None)
        for p, recursive, prune in self._roots:
            if p == root or p.startswith(under):
                try:
                    self._add(p, recursive, prune)
                    self.lost.discard(p)
                except OSError:
                    self.lost.add(p)

    def _events(self) -> Iterator[tuple[int, int, str]]:
        while True:
            try:
                buf = os.read(self.fd, 1 << 16)
            except BlockingIOError:
                return
            at = 0
            while at + _HEADER.size <= len(buf):
                wd, mask, _cookie, size = _HEADER.unpack_from(buf, at)
                at += _HEADER.size
                name = os.fsdecode(buf[at:at + size].rstrip(b"\0"))
                at += size
                yield wd, mask, name

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
