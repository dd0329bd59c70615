"""Which revision of the config directory is on disk: the git commit, and whether the
working tree differs from it. The daemon's Watcher is told of changes by inotify (or, where
inotify is unavailable, polls stat_signature() ten times a second), then compares content
and commit, so a new commit or an edited file is noticed without any hook."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable

from ..config.errors import ConfigError
from ..config.reader import read_bytes


def _yaml_files(directory: str) -> list[str]:
    """Every YAML file under ``directory`` (hidden directories such as .git skipped), in order.
    A symlinked directory is walked where its target is inside ``directory`` (the loader reads
    through such a link: `vips -> .gen/vips`), each real directory once (no loop); one leading
    out is not (the loader refuses what is in it)."""
    top = os.path.realpath(directory)
    paths: list[str] = []
    walked: set[str] = set()
    for root, dirs, files in os.walk(directory, followlinks=True):
        real = os.path.realpath(root)
        if real in walked:
            dirs[:] = []
            continue
        walked.add(real)
        names = sorted(d for d in dirs if not d.startswith("."))
        # A directory named like a YAML file too: the loader refuses it, so its coming and
        # going is a change.
        paths += [os.path.join(root, n) for n in sorted(files + names) if n.endswith((".yaml", ".yml"))]
        dirs[:] = [d for d in names if not os.path.islink(os.path.join(root, d))
                   or _inside(os.path.realpath(os.path.join(root, d)), top)]
    return paths


def _inside(real: str, top: str) -> bool:
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


# A file whose ctime or mtime is this close to the moment its stat was taken (or after it) is
# read again at the next look, whatever its stat data say: a write in the same tick of the
# file system's clock (one second on some) as the read leaves them as they were (git's
# "racily clean" entries, judged the same way against the index's mtime).
RACY_NS = 2_000_000_000

# path -> (the file's stat data when it was read, sha256 of the bytes read): FileStats.known
_Known = dict[str, tuple[tuple[str, int, int, int, int, int, int], bytes]]


class FileStats:
    """What a fingerprint() read, for the next one: each YAML file's stat data as it was just
    before its read (the real path, device, inode, mode, size, mtime, ctime) and the sha256 of
    its bytes. A file whose stat data are the same at the next look is not read again (the
    daemon's reload of 193 MB in 100 files read and hashed all of it for a one-line commit),
    unless it was racily clean (its ctime or mtime within RACY_NS of the read: changed in the
    same tick of the clock, the stat data would not say so). ``digests``: path -> sha256 of
    every file of the last fingerprint not refused (LoadCache.digests_now: the loader takes
    the files whose digest it loaded last as they are, without reading or decoding them)."""

    def __init__(self) -> None:
        self.known: _Known = {}
        self.digests: dict[str, bytes] = {}


def _file_key(path: str) -> tuple[str, int, int, int, int, int, int] | None:
    try:
        real = os.path.realpath(path)
        st = os.stat(real)
    except OSError:
        return None
    return (real, st.st_dev, st.st_ino, st.st_mode, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def fingerprint(directory: str, contents: dict[str, bytes] | None = None, stats: FileStats | None = None) -> str:
    """sha256 over every YAML file's name and content's sha256 (what the loader reads). A
    file the loader refuses (a symlink out of the checkout or to a device, a FIFO, a huge
    file) is never read here either: what it is and its stat data stand for its content, so
    it neither hangs nor exhausts memory, and the load that follows names it. ``contents``
    gets each file's bytes read (path -> bytes): the load that follows need not read them
    again (LoadCache.prefetched), and loads exactly what was hashed. ``stats``: the last
    fingerprint's FileStats; a file whose stat data did not move is not read (its digest is
    the one kept), and ``stats`` is updated to this look's."""
    h = hashlib.sha256()
    known: _Known = {}
    digests: dict[str, bytes] = {}
    before = stats.known if stats is not None else {}
    for path in _yaml_files(directory):
        h.update(os.path.relpath(path, directory).encode() + b"\0")
        key = _file_key(path) if stats is not None else None
        hit = before.get(path) if key is not None else None
        if hit is not None and hit[0] == key:
            digest = hit[1]
            known[path] = hit
        else:
            now = time.time_ns()  # (before the read: a write after it has a later ctime)
            try:
                data = read_bytes(path, inside=directory)
            except ConfigError as exc:
                h.update(f"<refused: {exc.issues[0].message} {_stat_key(path)}>".encode() + b"\0")
                continue
            digest = hashlib.sha256(data).digest()
            if contents is not None:
                contents[path] = data
            if key is not None and max(key[5], key[6]) < now - RACY_NS:
                known[path] = (key, digest)
        digests[path] = digest
        h.update(digest + b"\0")
    if stats is not None:
        stats.known, stats.digests = known, digests
    return h.hexdigest()


def _stat_key(path: str) -> tuple[int, int, int, int]:
    try:
        st = os.stat(path)
    except OSError:
        return (-1, -1, -1, -1)
    return (st.st_mode, st.st_size, st.st_ino, st.st_mtime_ns)


def stat_signature(directory: str, git_dir: str | None) -> tuple[tuple[str, int, int, int], ...]:
    """Names, sizes, inodes and mtimes of the YAML files and of the git files a commit,
    checkout or reset touches: cheap enough to poll ten times a second. When it changes,
    fingerprint() and revision() say whether the content or the commit really did."""
    out = []
    paths = _yaml_files(directory)
    if git_dir:
        common = common_dir(git_dir)
        paths += [os.path.join(git_dir, "HEAD"), os.path.join(git_dir, "index"), os.path.join(common, "packed-refs")]
        try:
            with open(os.path.join(git_dir, "HEAD"), encoding="utf-8") as f:
                head = f.read().strip()
            if head.startswith("ref: "):
                # (a branch's ref is in the common directory; a linked worktree's own refs,
                # refs/worktree and refs/bisect, in its git directory)
                ref = head[5:]
                per_worktree = ref.startswith(("refs/worktree/", "refs/bisect/"))
                paths.append(os.path.join(git_dir if per_worktree else common, ref))
        except OSError:
            pass
    for path in paths:
        try:
            st = os.stat(path)
            out.append((path, st.st_size, st.st_ino, st.st_mtime_ns))
        except OSError:
            out.append((path, -1, -1, -1))
    return tuple(out)


def common_dir(git_dir: str) -> str:
    """Where a checkout's branches and packed-refs are: its git directory, or for a linked
    worktree (`git worktree add`) the main repository's, which git names in the file
    ``commondir`` (git's own layout, read without running git)."""
    try:
        with open(os.path.join(git_dir, "commondir"), encoding="utf-8") as f:
            named = f.read().strip()
    except OSError:
        return git_dir
    return os.path.normpath(os.path.join(git_dir, named)) if named else git_dir


def git_dir(directory: str) -> str | None:
    """The checkout's git directory (absolute), None outside git."""
    d = _git(directory, "rev-parse", "--absolute-git-dir")
    return d or None


def _git(directory: str, *args: str) -> str | None:
    try:
        # --no-optional-locks: `git status` would otherwise refresh the index under
        # index.lock, and an operator's (or CI's) `git commit` in the checkout at that moment
        # fails with "index.lock: File exists" (seen: the benchmark's commits, every few minutes).
        r = subprocess.run(["git", "--no-optional-locks", "-C", directory, *args], capture_output=True, text=True,
                           timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _git_all(directory: str, *commands: tuple[str, ...]) -> list[str | None]:
    """``_git`` of each command, run side by side."""
    return _git_started(directory, *commands)()


class IndexCopy:
    """The controller's own copy of the checkout's git index, for ``git status``.

    ``git --no-optional-locks status`` never writes the index it refreshed (it must not take
    index.lock: an operator's commit at that moment would fail), so a file committed in the
    same second as the index was written stays "racily clean" for good: git cannot trust its
    stat data and hashes it again on every status (a 5.5 MB vips.yaml: 15-30 ms a reload,
    and every periodic look). A status on a copy of the index (GIT_INDEX_FILE) may write it:
    git refreshes the copy under the copy's own lock, as a plain ``git status`` would the
    index, and the next status trusts the stat data. The copy keeps the index's mtime (git's
    racy-entry rule is judged against it) and is taken again whenever the index changes
    (a commit, add, checkout, reset): what status answers is what it answers on the index.
    The copy lives in ``under`` (the daemon: STATE_DIR/git-index/PID-*), and a copy whose
    controller is gone (killed, or an error before its close) is removed by the next one."""

    def __init__(self, git_dir: str, under: str | None = None) -> None:
        self.index = os.path.join(git_dir, "index")
        self._gitmodules = os.path.join(_work_tree(git_dir), ".gitmodules")
        self._under = under  # where copies go (the state directory's git-index/); None: the temp dir
        self._dir: str | None = None
        self._key: tuple[int, int, int] | None = None
        self._lock = threading.Lock()

    def _make_dir(self) -> str:
        if self._under is None:
            return tempfile.mkdtemp(prefix="anycast-git-index-")
        os.makedirs(self._under, mode=0o700, exist_ok=True)
        for name in os.listdir(self._under):  # a killed controller's copies (PID-...), not a live one's
            pid = name.split("-", 1)[0]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                shutil.rmtree(os.path.join(self._under, name), ignore_errors=True)
        return tempfile.mkdtemp(prefix=f"{os.getpid()}-", dir=self._under)

    def path(self) -> str | None:
        """The copy, up to date with the index; None (git's own index, read only) if there is
        no index or it cannot be copied."""
        if os.path.exists(self._gitmodules):
            # A checkout with submodules keeps git's own index, read only: a status on the copy
            # may take optional locks, and it recurses into each submodule's real index.
            # (Looked at each time: a commit can add the first submodule.)
            return None
        with self._lock:
            try:
                st = os.stat(self.index)
                key = (st.st_ino, st.st_size, st.st_mtime_ns)
                if self._dir is None:
                    self._dir = self._make_dir()
                copy = os.path.join(self._dir, "index")
                if key != self._key or not os.path.exists(copy):  # (a copy someone removed: taken again)
                    tmp = copy + ".new"
                    shutil.copyfile(self.index, tmp)
                    os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))
                    os.replace(tmp, copy)
                    self._key = key
                return copy
            except OSError:
                self._key = None
                return None

    def close(self) -> None:
        with self._lock:
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir, self._key = None, None


def _work_tree(git_dir: str) -> str:
    """The top of the checkout a git directory is of: its parent, or for a linked worktree
    the directory of the ``.git`` file that git's ``gitdir`` file names."""
    try:
        with open(os.path.join(git_dir, "gitdir"), encoding="utf-8") as f:
            dot_git = f.read().strip()
    except OSError:
        return os.path.dirname(os.path.realpath(git_dir))
    return os.path.dirname(os.path.normpath(os.path.join(git_dir, dot_git)))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # another user's process: alive
    return True


def _git_started(directory: str, *commands: tuple[str, ...],
                 index: str | None = None) -> Callable[[], list[str | None]]:
    """_git_all's commands started now; the function returned waits for their answers.
    ``index``: GIT_INDEX_FILE for commands starting with "status" (IndexCopy), which may then
    write it (no --no-optional-locks: the lock is the copy's, not the checkout's)."""
    procs: list[subprocess.Popen[str] | None] = []
    for args in commands:
        own = index is not None and args[:1] == ("status",)
        env = {**os.environ, "GIT_INDEX_FILE": index} if own and index is not None else None
        try:
            procs.append(subprocess.Popen(["git", *(() if own else ("--no-optional-locks",)), "-C", directory, *args],
                                          text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env))
        except OSError:
            procs.append(None)

    def answers() -> list[str | None]:
        out: list[str | None] = []
        for proc in procs:
            if proc is None:
                out.append(None)
                continue
            try:
                stdout, _ = proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                out.append(None)
                continue
            out.append(stdout.strip() if proc.returncode == 0 else None)
        return out
    return answers


def revision(directory: str, fp: str | None = None, index: IndexCopy | None = None) -> str:
    """``3f2a9c1e0b7d`` for a clean checkout, ``3f2a9c1e0b7d+dirty.1a2b3c4d`` if files differ
    from the commit, ``sha256:...`` outside git. ``fp``: fingerprint(directory), if the
    caller has it already. ``index``: the caller's IndexCopy (status on it)."""
    return revision_started(directory, fp or fingerprint(directory), index)()


def revision_started(directory: str, fp: str, index: IndexCopy | None = None) -> Callable[[], str]:
    """revision(directory, fp), its git commands started now and their answers awaited when
    the function returned is called: the reload parses the files meanwhile (each git is a
    fork and an exec, and ``status`` hashes the changed files: 30-60 ms on a loaded machine)."""
    # (both at once, side by side)
    answers = _git_started(directory, ("rev-parse", "HEAD"), ("status", "--porcelain", "--", "."),
                           index=index.path() if index is not None else None)

    def result() -> str:
        head, dirty = answers()
        if not head:
            return f"sha256:{fp[:12]}"
        return head[:12] if not dirty else f"{head[:12]}+dirty.{fp[:8]}"
    return result


def checkout_at(directory: str, rev: str, into: str) -> str:
    """Extract ``directory`` as it is at git revision ``rev`` under ``into``; returns the
    extracted directory. Raises ValueError naming what git said."""
    top = _git(directory, "rev-parse", "--show-toplevel")
    if top is None:
        raise ValueError(f"{directory} is not inside a git checkout")
    rel = os.path.relpath(os.path.realpath(directory), os.path.realpath(top))
    spec = rev if rel == "." else f"{rev}:{rel}"
    r = subprocess.run(["git", "-C", top, "archive", "--format=tar", spec], capture_output=True, timeout=30)
    if r.returncode != 0:
        raise ValueError(f"git archive {spec}: {r.stderr.decode(errors='replace').strip()}")
    out = os.path.join(into, "at-" + "".join(c if c.isalnum() else "_" for c in rev))
    os.makedirs(out, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", out], input=r.stdout, check=True, capture_output=True, timeout=30)
    return out
