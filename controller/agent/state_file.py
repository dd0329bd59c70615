"""What the agent has announced, persisted so that a restarted agent knows what ExaBGP
may still hold (ExaBGP keeps routes when its API process dies and respawns it)."""

from __future__ import annotations

import ipaddress
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict

from ..config.model import Attributes, IPNetwork

log = logging.getLogger("controller.agent")

FILENAME = "announced.json"


def save(state_dir: str, announced: Mapping[IPNetwork, Attributes]) -> None:
    """Write atomically (temp file, fsync, rename): a crash leaves the old or the new file."""
    os.makedirs(state_dir, exist_ok=True)
    path = os.path.join(state_dir, FILENAME)
    # VIPs share a few attribute sets: each converted once. Without indent, json.dumps uses
    # the C encoder (10,000 prefixes: ~0.3 CPU s less per save).
    as_json: dict[Attributes, dict[str, object]] = {}
    data = {"version": 1, "announced": {str(p): as_json[a] if a in as_json else as_json.setdefault(a, _attrs_to_json(a))
                                        for p, a in announced.items()}}
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, sort_keys=True))  # (json.dump would take the pure-Python encoder)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load(state_dir: str) -> dict[IPNetwork, Attributes]:
    """What a previous run recorded; empty (with a warning) if absent or unreadable."""
    path = os.path.join(state_dir, FILENAME)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        return {
            ipaddress.ip_network(p): Attributes(
                med=a.get("med"), as_path_prepend=int(a.get("as_path_prepend", 0)),
                communities=tuple(a.get("communities", ())),
                large_communities=tuple(a.get("large_communities", ())),
                extended_communities=tuple(a.get("extended_communities", ())),
            )
            for p, a in data["announced"].items()
        }
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("ignoring unreadable state file %s: %s", path, exc)
        return {}


def _attrs_to_json(a: Attributes) -> dict[str, object]:
    d = asdict(a)
    d["communities"] = list(a.communities)
    d["large_communities"] = list(a.large_communities)
    d["extended_communities"] = list(a.extended_communities)
    return d
