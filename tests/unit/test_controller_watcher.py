"""Which file events make the controller's Watcher look again (the filter), and what its periodic look reads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from controller.server.daemon import _Relevant
from controller.server.inotify import Change
from tests.helpers.config_dirs import copy, edit

TOP, GIT = "/srv/desired", "/srv/repo/.git"


@pytest.mark.parametrize("change, path, relevant", [
    (Change.modified, "/srv/desired/vips.yaml", True),
    (Change.added, "/srv/desired/vips/team-a.yml", True),
    (Change.deleted, "/srv/desired/vips/team-a.yml", True),
    (Change.deleted, "/srv/desired/vips", True),  # a whole directory gone
    (Change.modified, "/srv/desired/README.md", False),
    (Change.modified, "/srv/desired/.hidden/vips.yaml", False),  # hidden directories are not read
    (Change.added, "/srv/desired/.vips.yaml.swp", False),
    (Change.modified, "/srv/repo/.git/HEAD", True),  # checkout
    (Change.added, "/srv/repo/.git/index", True),  # commit, reset
    (Change.modified, "/srv/repo/.git/refs/heads/main", True),  # commit on the branch
    (Change.modified, "/srv/repo/.git/packed-refs", True),
    (Change.added, "/srv/repo/.git/objects/ab/cdef", False),  # what a commit writes first: noise
    (Change.added, "/srv/repo/.git/index.lock", False),
    (Change.modified, "/srv/elsewhere/vips.yaml", False),
])
def test_only_yaml_files_and_the_git_files_of_a_commit_count(change: Change, path: str, relevant: bool) -> None:
    assert _Relevant(TOP, GIT)(change, path) is relevant


def test_the_periodic_look_reads_no_file_while_the_stat_data_stands_still_and_sees_an_unnotified_edit(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The safety-net look (every RECHECK s, for a lost notification) hashes the files and asks
    git only when their stat data moved: nothing read while nothing changes, and an edit that
    no notification announced is still seen. (Outside git here: a unit test starts no process;
    a commit moves the stat data of HEAD, index and the branch's ref, which stat_signature lists.)"""
    from controller.server import daemon

    config = copy(tmp_path)
    hashed: list[str] = []
    real = daemon.fingerprint
    monkeypatch.setattr(daemon, "fingerprint", lambda d, contents=None, stats=None: hashed.append(d) or real(d, contents, stats))
    monkeypatch.setattr(daemon, "git_dir", lambda d: None)
    monkeypatch.setattr(daemon, "revision", lambda d, fp=None, index=None: f"sha256:{(fp or real(d))[:12]}")
    monkeypatch.setattr(daemon, "RECHECK", 0.0)  # every changed() is the periodic look
    watcher = daemon.Watcher(str(config), str(tmp_path / "state"))
    try:
        assert watcher.load().vip("api-eu") is not None
        hashed.clear()
        assert not watcher.changed() and not watcher.changed()
        assert hashed == []  # nothing moved: nothing read
        edit(config, "vips.yaml", lambda v: v["vips"][1].__setitem__("publish", ["fra"]))
        assert watcher.changed() and len(hashed) == 1
        assert watcher.load().vip("api-eu").publish == ("fra",)  # type: ignore[union-attr]
        assert not watcher.changed() and len(hashed) == 1
    finally:
        watcher.close()


def test_a_new_revision_of_the_same_files_is_not_read_again_and_an_edit_is(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An edit loaded as "+dirty", then its commit: the commit changes the revision only (the
    files' names and bytes are the same), so the desired state is the one loaded, with the new
    revision, and the files are not parsed again; the next edit is read."""
    from controller.server import daemon

    config = copy(tmp_path)
    revisions = iter(("abc+dirty.1", "abc", "def+dirty.2"))
    loads: list[str] = []
    real = daemon.load_desired
    monkeypatch.setattr(daemon, "load_desired", lambda d, rev, cache=None: loads.append(rev) or real(d, rev, cache))
    monkeypatch.setattr(daemon, "git_dir", lambda d: None)
    monkeypatch.setattr(daemon, "revision", lambda d, fp=None, index=None: next(revisions))
    watcher = daemon.Watcher(str(config), str(tmp_path / "state"))
    try:
        first = watcher.load()
        again = watcher.load()  # the commit: same files
        assert loads == ["abc+dirty.1"] and again.revision == "abc"
        assert again.vips == first.vips and again.state_dir == str(tmp_path / "state")
        edit(config, "vips.yaml", lambda v: v["vips"][1].__setitem__("publish", ["fra"]))
        edited = watcher.load()
        assert loads == ["abc+dirty.1", "def+dirty.2"]
        assert edited.vip("api-eu").publish == ("fra",)  # type: ignore[union-attr]
    finally:
        watcher.close()


def test_a_loader_bug_refuses_the_revision_as_a_config_error_and_the_next_one_loads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reload loops (the daemon's, a follower's SIGHUP, anycastctl) refuse a ConfigError and
    keep what they serve; anything else escaping the loader ended the controller (h/review
    found several inputs that did). The Watcher turns it into a ConfigError naming the error."""
    from controller.config.errors import ConfigError
    from controller.server import daemon

    config = copy(tmp_path)
    monkeypatch.setattr(daemon, "git_dir", lambda d: None)
    monkeypatch.setattr(daemon, "revision", lambda d, fp=None, index=None: "sha256:test")
    watcher = daemon.Watcher(str(config))
    real = daemon.load_desired

    def broken(*args: object, **kw: object) -> object:
        raise OverflowError("int too large to convert to float")

    monkeypatch.setattr(daemon, "load_desired", broken)
    with pytest.raises(ConfigError) as exc:
        watcher.load()
    assert "OverflowError: int too large to convert to float" in exc.value.summary()
    monkeypatch.setattr(daemon, "load_desired", real)
    assert watcher.load().vips  # the loader fixed: the same checkout loads


def test_a_reload_loads_the_bytes_its_look_hashed_without_reading_them_again(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """changed() hashes every file; the load that follows takes those bytes (no second read,
    and exactly the content whose fingerprint ``seen`` holds) and says what a load from
    nothing says."""
    from controller.config import desired as loader
    from controller.server import daemon

    config = copy(tmp_path)
    monkeypatch.setattr(daemon, "git_dir", lambda d: None)
    monkeypatch.setattr(daemon, "revision", lambda d, fp=None, index=None: "rev")
    watcher = daemon.Watcher(str(config), str(tmp_path / "state"))
    read: list[str] = []
    real = loader.read_text
    monkeypatch.setattr(loader, "read_text", lambda path, inside=None: read.append(path) or real(path, inside))
    try:
        first = watcher.load()
        assert read == []  # (load() hashed them itself first)
        edit(config, "vips.yaml", lambda v: v["vips"][1].__setitem__("publish", ["fra"]))
        watcher._dirty = True  # (what a notification does)
        assert watcher.changed()
        edited = watcher.load()
        assert read == [] and edited != first
        assert edited == dataclasses.replace(loader.load_desired(str(config), "rev"), state_dir=str(tmp_path / "state"))
    finally:
        watcher.close()
