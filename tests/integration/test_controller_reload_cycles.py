"""The controller daemon freezes its heap after each reload (server/daemon.py, _freeze_heap):
what a later reload drops is then freed by reference counting alone, and cyclic garbage alive
at a freeze is never collected. So a reload must make no cyclic garbage, and what it drops (the
last desired state, its load cache) must hold no reference cycle."""

from __future__ import annotations

import gc
import shutil
from pathlib import Path

from controller.server.daemon import Watcher
from tests.helpers.controller_process import git

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "controller"


def test_a_reload_makes_and_drops_no_cyclic_garbage(tmp_path: Path) -> None:
    d = tmp_path / "desired"
    shutil.copytree(CONFIG, d)
    git(d, "init", "-q")
    git(d, "add", "-A")
    git(d, "commit", "-qm", "initial")
    watcher = Watcher(str(d), str(tmp_path / "state"), use_inotify=False)
    current = watcher.load_at_start()
    vips = d / "vips.yaml"
    text = vips.read_text()
    for i, edit in enumerate([text + "\n# a comment\n", text.replace("\n", "\n\n", 3), text]):
        vips.write_text(edit)
        git(d, "commit", "-qam", f"change {i}")
        gc.collect()
        gc.freeze()
        try:
            new = watcher.reload(True)
            assert new is not None and new.revision != current.revision
            assert gc.collect() == 0  # none made by the reload
            current = new
        finally:
            gc.unfreeze()
        assert gc.collect() == 0  # none among what it dropped (frozen before it)
