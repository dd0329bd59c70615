"""A lab fleet for a test module: built, clients started, its JSON report written and the
lab torn down at the end, pass or fail."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lab.fleet import Fleet
from lab.netns import Lab


@contextlib.contextmanager
def lab_fleet(prefix: str, build: Callable[[Lab], Fleet], vip: str, report: dict[str, Any],
              report_path: Path) -> Iterator[Fleet]:
    lab = Lab(prefix)
    try:
        f = build(lab).up()
        f.start_clients(vip)
        yield f
    finally:
        report_path.write_text(json.dumps(report, indent=1))
        print(f"\nlab scenario report: {report_path}")
        lab.teardown()
