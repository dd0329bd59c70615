"""A copy of the example controller config directory to edit, and its load errors (config tests)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from controller.config.desired import load_desired
from controller.config.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[2] / "configs" / "controller"


def copy(tmp_path: Path) -> Path:
    d = tmp_path / "controller"
    shutil.copytree(EXAMPLE, d)
    return d


def edit(d: Path, name: str, change: Callable[[dict], None]) -> None:
    data = yaml.safe_load((d / name).read_text())
    change(data)
    (d / name).write_text(yaml.safe_dump(data))


def errors(d: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_desired(str(d))
    return [str(i) for i in info.value.issues]
