"""git status on the controller's own copy of the index (revision.IndexCopy): a file committed
in the same second as the index was written ("racily clean") is hashed once, not on every
reload (`git --no-optional-locks status` never writes the index it refreshed: a 5.5 MB file
cost 15-30 ms a reload), the checkout's own index is never written, and what status answers
is unchanged: clean, "+dirty" after an edit, clean again once it is undone or committed.
The race is made with mtimes, not by waiting for a second to pass."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from controller.server.revision import IndexCopy, fingerprint, revision
from tests.helpers.controller_process import git


def _racy(d: Path) -> int:
    """vips.yaml committed, its mtime and the index's in one second (T = a whole second an
    hour ago): git cannot trust the entry's stat data. Returns T in ns."""
    t = (int(os.stat(d / "vips.yaml").st_mtime) - 3600) * 10**9
    os.utime(d / "vips.yaml", ns=(t, t))
    git(d, "add", "vips.yaml")
    git(d, "commit", "-qm", "racy", "--allow-empty")
    os.utime(d / ".git" / "index", ns=(t + 5 * 10**8, t + 5 * 10**8))
    return t


def _status_hashes(d: Path, index: str | None) -> bool:
    """Whether `git status` must read vips.yaml's content (its entry is racily clean)."""
    env = {**os.environ, **({"GIT_INDEX_FILE": index} if index else {})}
    out = subprocess.run(["git", "-C", str(d), "ls-files", "--debug", "vips.yaml"], capture_output=True,
                         text=True, env=env, check=True).stdout
    mtime = int(next(line for line in out.splitlines() if "mtime:" in line).split()[1].split(":")[0])
    return mtime >= int(os.stat(index or d / ".git" / "index").st_mtime)


def test_status_on_the_copy_refreshes_a_racily_clean_entry_once_and_answers_as_before(tmp_path: Path) -> None:
    d = tmp_path / "c"
    d.mkdir()
    git(d, "init", "-q")
    (d / "vips.yaml").write_text("vips: []\n" + "# padding\n" * 1000)
    git(d, "add", "-A")
    git(d, "commit", "-qm", "one")
    _racy(d)
    head = git(d, "rev-parse", "HEAD")[:12]
    real_index = os.stat(d / ".git" / "index")
    assert _status_hashes(d, None)  # (the race as made)

    copy = IndexCopy(str(d / ".git"))
    assert revision(str(d), index=copy) == head
    assert revision(str(d), index=copy) == head
    path = copy.path()
    assert path is not None and not _status_hashes(d, path)  # the copy refreshed: trusted now
    after = os.stat(d / ".git" / "index")
    assert (after.st_ino, after.st_mtime_ns) == (real_index.st_ino, real_index.st_mtime_ns)  # not written
    assert _status_hashes(d, None)  # (the checkout's index as it was)

    (d / "vips.yaml").write_text("vips: []\n" + "# paddinG\n" * 1000)  # same size
    fp = fingerprint(str(d))
    assert revision(str(d), fp, copy) == f"{head}+dirty.{fp[:8]}" == revision(str(d), fp)
    (d / "vips.yaml").write_text("vips: []\n" + "# padding\n" * 1000)
    assert revision(str(d), index=copy) == head
    (d / "vips.yaml").write_text("vips: []\n")
    git(d, "commit", "-qam", "two")  # the index changes: copied again
    assert revision(str(d), index=copy) == git(d, "rev-parse", "HEAD")[:12]
    (d / "new.yaml").write_text("x: 1\n")  # untracked: dirty, as before
    assert "+dirty." in revision(str(d), index=copy) and "+dirty." in revision(str(d))
    copy.close()
    assert not os.path.exists(path)


def _checkout(d: Path) -> str:
    d.mkdir()
    git(d, "init", "-q")
    (d / "vips.yaml").write_text("vips: []\n")
    git(d, "add", "-A")
    git(d, "commit", "-qm", "one")
    return git(d, "rev-parse", "HEAD")[:12]


def test_copies_live_under_the_state_dir_and_a_killed_controllers_are_removed(tmp_path: Path) -> None:
    d = tmp_path / "c"
    head = _checkout(d)
    under = tmp_path / "state" / "git-index"
    under.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (under / f"{dead.pid}-left").mkdir()  # a copy whose controller is gone
    (under / f"{os.getppid()}-live").mkdir()  # another live process's: kept
    copy = IndexCopy(str(d / ".git"), str(under))
    assert revision(str(d), index=copy) == head
    path = copy.path()
    assert path is not None and Path(path).parent.parent == under
    assert not (under / f"{dead.pid}-left").exists() and (under / f"{os.getppid()}-live").exists()
    os.unlink(path)  # the copy removed behind its back: taken again, not read as missing (all dirty)
    assert revision(str(d), index=copy) == head and os.path.exists(path)
    copy.close()
    assert not Path(path).parent.exists()


def test_a_repository_with_submodules_keeps_gits_own_index_read_only(tmp_path: Path) -> None:
    d = tmp_path / "c"
    head = _checkout(d)
    (d / ".gitmodules").write_text("")
    git(d, "add", ".gitmodules")
    git(d, "commit", "-qm", "modules")
    head = git(d, "rev-parse", "HEAD")[:12]
    copy = IndexCopy(str(d / ".git"))
    assert copy.path() is None
    assert revision(str(d), index=copy) == head


def test_a_submodule_added_later_or_in_a_linked_worktree_keeps_gits_own_index(tmp_path: Path) -> None:
    """The submodule rule is looked at on each use, at the checkout's top: a commit that adds
    the first submodule while the controller runs turns the copy off (it was judged once, at
    start), and a linked worktree's top is found from its git directory (.git/worktrees/NAME,
    whose parent is not the checkout)."""
    d = tmp_path / "c"
    _checkout(d)
    copy = IndexCopy(str(d / ".git"))
    assert copy.path() is not None
    (d / ".gitmodules").write_text("")
    git(d, "add", ".gitmodules")
    git(d, "commit", "-qm", "modules")
    assert copy.path() is None
    assert revision(str(d), index=copy) == git(d, "rev-parse", "HEAD")[:12]
    copy.close()
    linked = tmp_path / "linked"
    git(d, "worktree", "add", "-q", "-b", "pop", str(linked))
    gd = git(linked, "rev-parse", "--absolute-git-dir")
    assert Path(gd).parent.name == "worktrees"
    assert IndexCopy(gd).path() is None  # (its .gitmodules is the linked checkout's)
