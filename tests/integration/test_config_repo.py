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


def test_ci_step_fails_a_change_over_the_budget_unless_a_commit_declares_it(tmp_path: Path) -> None:
    """Removing every VIP withdraws 5 of 5 announced pairs (budget: 25%): the CI step fails it,
    as the controller would hold it, until a commit carries ``Blast-Radius: intended``."""
    repo = make_repo(tmp_path)
    sh(repo, "git", "checkout", "-qb", "retire")
    edit_vips(repo, lambda d: d.__setitem__("vips", []))
    assert sh(repo, "git", "commit", "-qam", "retire every VIP").returncode == 0
    r = sh(repo, str(ROOT / "ops" / "config-repo" / "ci-check"), "main")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "over the blast-radius budget" in r.stderr and "withdraws 5 of 5" in r.stdout
    assert sh(repo, "git", "commit", "-q", "--allow-empty", "-m", "retire every VIP\n\nBlast-Radius: intended"
              ).returncode == 0
    r = sh(repo, str(ROOT / "ops" / "config-repo" / "ci-check"), "main")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "declares the blast radius intended" in r.stdout


def test_the_daemons_cheap_watch_sees_edits_new_files_and_commits(tmp_path: Path) -> None:
    """The controller polls stat data ten times a second and reloads when it changes: an
    edited file, a new vips/*.yaml, and a commit that changes no file (it changes the
    revision the plans carry) must each change the signature; nothing happening must not."""
    from controller.server.revision import git_dir, stat_signature

    repo = make_repo(tmp_path)
    os.remove(repo / ".git" / "hooks" / "pre-commit")  # the hook is tested above; here only git
    gd = git_dir(str(repo))
    assert gd == str(repo / ".git")
    first = stat_signature(str(repo), gd)
    assert stat_signature(str(repo), gd) == first
    edit_vips(repo, lambda d: d["vips"][0].__setitem__("enabled", False))
    edited = stat_signature(str(repo), gd)
    assert edited != first
    assert sh(repo, "git", "commit", "-qam", "disable").returncode == 0
    committed = stat_signature(str(repo), gd)
    assert committed != edited
    assert sh(repo, "git", "commit", "-q", "--allow-empty", "-m", "no file changed").returncode == 0
    assert stat_signature(str(repo), gd) != committed
    (repo / "vips").mkdir()
    (repo / "vips" / "more.yaml").write_text("vips: []\n")
    assert len(stat_signature(str(repo), gd)) == len(committed) + 1
