"""Which file events make the controller's Watcher look again (pure: the filter only)."""

from __future__ import annotations

import pytest
from watchfiles import Change

from controller.server.daemon import _Relevant

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
