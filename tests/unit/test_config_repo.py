"""An operator's config repository: the pre-commit hook and the CI step, as a user runs them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
       "GIT_AUTHOR_NAME": "op", "GIT_AUTHOR_EMAIL": "op@example.org",
       "GIT_COMMITTER_NAME": "op", "GIT_COMMITTER_EMAIL": "op@example.org"}


def sh(repo: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), cwd=repo, env=ENV, capture_output=True, text=True, timeout=60)


def edit_vips(repo: Path, change: object) -> None:
    data = yaml.safe_load((repo / "vips.yaml").read_text())
    change(data)  # type: ignore[operator]
    (repo / "vips.yaml").write_text(yaml.safe_dump(data))


def make_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "fleet-config"
    shutil.copytree(ROOT / "configs" / "controller", repo)
    assert sh(repo, "git", "init", "-q", "-b", "main").returncode == 0
    sh(repo, "git", "add", "-A")
    assert sh(repo, "git", "commit", "-qm", "initial").returncode == 0
    hook = repo / ".git" / "hooks" / "pre-commit"
    shutil.copy(ROOT / "ops" / "config-repo" / "pre-commit", hook)
    hook.chmod(0o755)
    return repo


def test_pre_commit_hook_refuses_an_invalid_desired_state(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    head = sh(repo, "git", "rev-parse", "HEAD").stdout
    edit_vips(repo, lambda d: d["vips"][0]["publish"].append("lhr"))
    sh(repo, "git", "add", "-A")
    r = sh(repo, "git", "commit", "-qm", "add lhr")
    assert r.returncode != 0
    assert "vips.yaml: vips[0].publish[3]: unknown POP 'lhr'" in r.stdout + r.stderr
    assert sh(repo, "git", "rev-parse", "HEAD").stdout == head  # nothing committed


def test_ci_step_shows_what_the_change_does_at_which_pop(tmp_path: Path) -> None:
    repo = make_repo(tmp_path)
    sh(repo, "git", "checkout", "-qb", "change")

    def change(d: dict) -> None:
        d["vips"][1]["publish"] = ["fra"]  # api-eu leaves sjc
        d["vips"][0]["origins"].reverse()  # game-global: eu-central becomes primary

    edit_vips(repo, change)
    assert sh(repo, "git", "commit", "-qam", "move things").returncode == 0  # the hook passes it
    r = sh(repo, str(ROOT / "ops" / "config-repo" / "ci-check"), "main")
    assert r.returncode == 0, r.stderr
    lines = [" ".join(line.split()) for line in r.stdout.splitlines()]
    assert "sjc api-eu withdraw no longer published at this POP" in lines
    for pop in ("fra", "sin", "sjc"):
        assert f"{pop} game-global move from us-west to eu-central" in lines
    assert not any(line.startswith("fra api-eu") for line in lines)  # untouched where unchanged
