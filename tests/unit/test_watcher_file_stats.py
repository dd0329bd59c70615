"""The Watcher's reload reads only the files whose stat data moved (revision.FileStats), and
the loader takes the others as loaded last without decoding them: a file rewritten with the
same size and mtime is still read when it was racily clean, a renamed or deleted file is
noticed, a refused file stays refused. Outside git (a unit test starts no process)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import yaml

from controller.config import desired as desired_mod
from controller.config.errors import ConfigError
from controller.server import daemon, revision
from tests.helpers.config_dirs import copy


def _split(tmp_path: Path) -> Path:
    """The example config with its last VIP moved to vips/team.yaml (two VIP files)."""
    d = copy(tmp_path)
    data = yaml.safe_load((d / "vips.yaml").read_text())
    last = data["vips"].pop()
    (d / "vips.yaml").write_text(yaml.safe_dump(data))
    (d / "vips").mkdir()
    (d / "vips" / "team.yaml").write_text(yaml.safe_dump({"vips": [last]}))
    return d


def _watcher(d: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> daemon.Watcher:
    monkeypatch.setattr(daemon, "git_dir", lambda directory: None)
    monkeypatch.setattr(daemon, "revision", lambda directory, fp=None, index=None: f"sha256:{(fp or '')[:12]}")
    monkeypatch.setattr(daemon, "revision_started",
                        lambda directory, fp, index=None: lambda: f"sha256:{fp[:12]}")  # (no git here)
    return daemon.Watcher(str(d), str(tmp_path / "state"), use_inotify=False)


class _Reads:
    """The paths the fingerprint reads and the loader reads or decodes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.read: list[str] = []
        self.decoded: list[str] = []
        real_read, real_decode, real_text = revision.read_bytes, desired_mod.decode_text, desired_mod.read_text
        monkeypatch.setattr(revision, "read_bytes", lambda p, **k: self.read.append(p) or real_read(p, **k))
        monkeypatch.setattr(desired_mod, "decode_text", lambda p, b: self.decoded.append(p) or real_decode(p, b))
        monkeypatch.setattr(desired_mod, "read_text", lambda p, **k: self.decoded.append(p) or real_text(p, **k))

    def names(self, d: Path) -> tuple[set[str], set[str]]:
        out = {os.path.relpath(p, d) for p in self.read}, {os.path.relpath(p, d) for p in self.decoded}
        self.read.clear()
        self.decoded.clear()
        return out


def test_a_reload_reads_and_decodes_only_the_file_that_changed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(revision, "RACY_NS", 0)  # (files written just now count as old here)
    d = _split(tmp_path)
    watcher = _watcher(d, tmp_path, monkeypatch)
    try:
        first = watcher.load()
        reads = _Reads(monkeypatch)
        team = yaml.safe_load((d / "vips" / "team.yaml").read_text())
        name = team["vips"][0]["name"]
        team["vips"][0]["publish"] = team["vips"][0]["publish"][:1]
        (d / "vips" / "team.yaml").write_text(yaml.safe_dump(team))
        watcher._dirty = True  # (as inotify's event marks it)
        new = watcher.reload()
        assert new is not None and new.revision != first.revision
        assert new.vip(name).publish == tuple(team["vips"][0]["publish"])  # type: ignore[union-attr]
        assert reads.names(d) == ({"vips/team.yaml"}, {"vips/team.yaml"})  # vips.yaml etc: neither
        # Nothing moved: a look reads nothing and loads nothing.
        watcher._dirty = True
        assert watcher.reload() is None
        assert reads.names(d) == (set(), set())
        # SIGHUP's forced reload trusts no stat data: every file read and hashed again (a
        # filesystem whose stat data lag), none decoded (each hashes to what was loaded).
        again = watcher.reload(forced=True)
        assert again is not None and again.revision == new.revision
        read, decoded = reads.names(d)
        assert "vips/team.yaml" in read and len(read) > 1 and decoded == set()
    finally:
        watcher.close()


def test_a_file_rewritten_with_its_size_and_mtime_is_read_again_while_racily_clean(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An edit of the same length whose mtime is put back (or falls in the same tick of the
    clock) leaves size and mtime as they were: a file read within RACY_NS of its ctime or
    mtime is read at the next look whatever its stat data say."""
    d = _split(tmp_path)
    watcher = _watcher(d, tmp_path, monkeypatch)
    try:
        first = watcher.load()
        path = d / "vips" / "team.yaml"
        st = path.stat()
        text = path.read_text()
        name = yaml.safe_load(text)["vips"][0]["name"]
        old = str(first.vip(name).vip.prefix).split("/")[0]  # type: ignore[union-attr]
        changed = old[:-1] + ("7" if old[-1] != "7" else "8")
        assert len(changed) == len(old) and old in text
        path.write_text(text.replace(old, changed))
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns
        new = watcher.reload(forced=True)
        assert new is not None
        assert str(new.vip(name).vip.prefix).split("/")[0] == changed  # type: ignore[union-attr]
    finally:
        watcher.close()


def test_the_racy_rule_reads_a_file_whose_stat_data_are_recent_and_trusts_an_old_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same stat data at both looks (a write in the same tick): read again while its
    mtime or ctime is within RACY_NS of the read; once older, not read."""
    d = _split(tmp_path)
    reads = _Reads(monkeypatch)
    real_key = revision._file_key
    stamp = [time.time_ns()]

    def key(path: str) -> tuple[str, int, int, int, int, int, int] | None:
        k = real_key(path)
        return None if k is None else (*k[:5], stamp[0], stamp[0])
    monkeypatch.setattr(revision, "_file_key", key)
    stats = revision.FileStats()
    fp = revision.fingerprint(str(d), {}, stats)
    everything, _ = reads.names(d)
    assert "vips/team.yaml" in everything
    assert revision.fingerprint(str(d), {}, stats) == fp
    assert reads.names(d)[0] == everything  # racily clean: all read again
    stamp[0] = time.time_ns() - 2 * revision.RACY_NS
    revision.fingerprint(str(d), {}, stats)
    assert reads.names(d)[0] == everything  # (the old stat data were recent: read, now trusted)
    assert revision.fingerprint(str(d), {}, stats) == fp
    assert reads.names(d)[0] == set()
    # Without stats (anycastctl, tests) the same fingerprint, every file read.
    assert revision.fingerprint(str(d)) == fp


def test_a_renamed_and_a_deleted_file_are_noticed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(revision, "RACY_NS", 0)
    d = _split(tmp_path)
    watcher = _watcher(d, tmp_path, monkeypatch)
    try:
        first = watcher.load()
        name = yaml.safe_load((d / "vips" / "team.yaml").read_text())["vips"][0]["name"]
        assert first.vip(name) is not None
        os.rename(d / "vips" / "team.yaml", d / "vips" / "other.yaml")  # (same inode, stat data, bytes)
        renamed = watcher.reload(forced=True)
        assert renamed is not None and renamed.revision != first.revision
        assert renamed.vip(name) is not None
        assert watcher.cache.files.keys() >= {"vips/other.yaml"} and "vips/team.yaml" not in watcher.cache.files
        os.unlink(d / "vips" / "other.yaml")
        gone = watcher.reload(forced=True)
        assert gone is not None and gone.vip(name) is None
        assert len(gone.vips) == len(first.vips) - 1
    finally:
        watcher.close()


def test_a_refused_file_stays_refused_when_its_stat_data_stand_still(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file the last load refused is not taken from the cache of the load before: its
    digest is not the one loaded, so the loader reads it again (and refuses it again); put
    back, it loads."""
    monkeypatch.setattr(revision, "RACY_NS", 0)
    d = _split(tmp_path)
    watcher = _watcher(d, tmp_path, monkeypatch)
    try:
        watcher.load()
        path = d / "vips" / "team.yaml"
        good = path.read_text()
        path.write_text(good + "  - name: [unclosed\n")
        for _ in range(2):
            with pytest.raises(ConfigError):
                watcher.reload(forced=True)
        path.write_text(good)
        assert watcher.reload(forced=True) is not None
    finally:
        watcher.close()
