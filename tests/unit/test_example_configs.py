"""The example configs are safe to copy: metrics (which carry no token) listen on loopback,
not on every interface of a router; the committed lab tokens say they are for the lab only."""

from __future__ import annotations

import ipaddress
from pathlib import Path

from controller.config.agent import load_agent_config
from controller.config.desired import load_desired

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
TOKENS = CONFIGS / "controller" / "lab-tokens"


def test_example_metrics_listen_on_loopback() -> None:
    listens = {p.name: load_agent_config(str(p)).metrics_listen for p in sorted(CONFIGS.glob("agent-*.yaml"))}
    listens["controller"] = load_desired(str(CONFIGS / "controller"), "test").metrics_listen
    assert len(listens) >= 3
    for name, listen in listens.items():
        assert listen is not None, f"{name}: metrics off in the example"
        assert ipaddress.ip_address(listen[0]).is_loopback, f"{name}: metrics listen on {listen[0]}, not loopback"


def test_lab_tokens_say_they_are_for_the_lab_only() -> None:
    readme = (TOKENS / "README.md").read_text()
    assert "for the lab and the tests only" in readme.splitlines()[0].lower()
    tokens = sorted(TOKENS.glob("*.token"))
    assert tokens
    for t in tokens:
        assert t.read_text().strip().startswith("lab-only-"), f"{t.name}: the token itself must say lab-only"
    for f in ("pops.yaml", "controller.yaml"):
        assert "FOR THE LAB ONLY" in (CONFIGS / "controller" / f).read_text(), f"{f}: no lab-only warning"
