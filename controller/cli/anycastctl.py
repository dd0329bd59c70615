"""``anycastctl``: the operator's CLI.

    anycastctl validate PATH [PATH ...]   check configs without touching anything
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from ..config.agent import load_agent_config
from ..config.desired import load_desired
from ..config.errors import ConfigError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="anycastctl", description="Operate the BGP anycast controller")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check an agent config file or a controller config directory; "
                                        "lists every error with its path")
    v.add_argument("paths", nargs="+", metavar="PATH")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def cmd_validate(paths: Sequence[str], as_json: bool) -> int:
    results: list[dict[str, Any]] = []
    for path in paths:
        try:
            if os.path.isdir(path):
                desired = load_desired(path)
                summary = (f"controller config: {len(desired.pops)} POP(s), {len(desired.vips)} VIP(s)")
            else:
                config = load_agent_config(path)
                summary = (f"POP {config.pop}: {len(config.vips)} VIP(s), "
                           f"{len(config.neighbors)} BGP neighbour(s)")
            results.append({"path": path, "ok": True, "errors": [], "summary": summary})
        except ConfigError as exc:
            results.append({"path": path, "ok": False, "summary": f"{len(exc.issues)} error(s)",
                            "errors": [{"path": i.path, "message": i.message} for i in exc.issues]})
    if as_json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['path']}: {'OK' if r['ok'] else 'INVALID'}, {r['summary']}")
            for e in r["errors"]:
                print(f"  {e['path'] + ': ' if e['path'] else ''}{e['message']}")
    return 0 if all(r["ok"] for r in results) else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "validate":
        return cmd_validate(args.paths, args.json)
    return 2


if __name__ == "__main__":
    sys.exit(main())
