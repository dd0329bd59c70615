"""``anycastctl agent status``: the POP agent's own view, read from its local socket
(controller/agent/local_status.py), without the controller. ``render`` is pure."""

from __future__ import annotations

import json
import socket
from typing import Any

from ..agent.local_status import FORMAT, SOCKET_NAME
from .conventions import Exit
from .operator_api import ApiError

DEFAULT_STATE_DIR = "/var/lib/anycast-agent"  # systemd/anycast-agent.service's StateDirectory
DEFAULT_SOCKET = f"{DEFAULT_STATE_DIR}/{SOCKET_NAME}"
MAX_ANSWER = 64 * 1024 * 1024  # 10,000 VIPs with their backends is a few MB


def fetch(path: str, timeout: float = 10.0) -> dict[str, Any]:
    """The agent's status document; raises ApiError with the exit code that says what failed."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    chunks: list[bytes] = []
    try:
        sock.connect(path)
        size = 0
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_ANSWER:
                raise ApiError(f"{path}: the answer is over {MAX_ANSWER} bytes: not the agent's status",
                               Exit.BAD_ANSWER)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise ApiError(f"no agent answers at {path} ({exc.strerror}): is anycast-agent running, with this "
                       f"state dir? (--socket)", Exit.UNREACHABLE) from None
    except PermissionError:
        raise ApiError(f"{path}: permission denied (the socket is the agent's user's only: run as root)",
                       Exit.DENIED) from None
    except socket.timeout:
        raise ApiError(f"{path}: no answer within {timeout:.0f}s", Exit.UNREACHABLE) from None
    except OSError as exc:
        raise ApiError(f"{path}: {exc.strerror or exc}", Exit.UNREACHABLE) from None
    finally:
        sock.close()
    try:
        doc = json.loads(b"".join(chunks))
    except ValueError:
        raise ApiError(f"{path}: the answer is not JSON: not the agent's status socket?", Exit.BAD_ANSWER) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        got = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise ApiError(f"{path}: status format {got!r}, this anycastctl reads {FORMAT}: "
                       "is the agent of the same version?", Exit.BAD_ANSWER)
    return doc


def _attrs(a: dict[str, Any] | None) -> str:
    if a is None:
        return "-"
    parts = [f"med {a['med']}" if a["med"] is not None else "no med"]
    if a["as_path_prepend"]:
        parts.append(f"prepend {a['as_path_prepend']}")
    parts += list(a["communities"]) + list(a["large_communities"])
    return ", ".join(parts)


def _ago(at: float | None, now: float) -> str:
    return "never" if not at else f"{max(0.0, now - at):.1f}s ago"


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


_HOLDS = {True: "announced", False: "not announced", None: "maybe (from before a restart)"}
_SYNC = {True: "", False: "  [ExaBGP differs: the next pass corrects it]", None: ""}


def render(doc: dict[str, Any]) -> str:
    """The human form of the status document."""
    now = float(doc["now"])
    plan = doc["plan"]
    out = [f"POP {doc['pop']} (anycast-agent {doc['version']})",
           f"plan: generation {plan['generation']} from {plan['source']}"
           + (f", revision {plan['revision']}" if plan["revision"] else "")]
    ctl = doc["controller"]
    if ctl is None:
        out.append("controller: none (standalone: the plan is the local config)")
    else:
        link = {True: "reachable", False: "UNREACHABLE (following the last plan)", None: "not tried yet"}
        out.append(f"controller: {ctl['url']} {link[ctl['reachable']]}")
    cfg = doc["config"]
    out.append(f"config: last reload {'ok' if cfg['last_reload_ok'] else 'REJECTED (the last good one runs)'}, "
               f"{_ago(cfg['last_reload_at'], now)}; last good reconcile "
               f"{_ago(doc['last_reconcile_success_at'], now)}")
    bgp = doc["bgp"]
    out += ["", f"BGP sessions (local AS {bgp['local_as']}):"]
    out.append(_table([[s["neighbor"], str(s["peer_as"]), s["local_address"], s["state"]] for s in bgp["sessions"]],
                      ["NEIGHBOR", "PEER AS", "LOCAL ADDRESS", "STATE"]))
    out += ["", "VIPs:"]
    rows = []
    for v in doc["vips"]:
        healthy = sum(1 for b in v["backends"] if b["phase"] in ("up", "falling") and b["origin"] == v["origin"])
        active = sum(1 for b in v["backends"] if b["origin"] == v["origin"])
        rows.append([v["name"], v["prefix"], v["action"], v["reason"], v["origin"] or "-",
                     f"{healthy}/{active}" if v["origin"] else "-", _HOLDS[v["exabgp"]["holds"]]])
    out.append(_table(rows, ["VIP", "PREFIX", "DECISION", "REASON", "ORIGIN", "HEALTHY", "EXABGP"]))
    for v in doc["vips"]:
        line = f"  {v['name']}: wants {_attrs(v['intended'])}; ExaBGP holds {_attrs(v['exabgp']['attributes'])}"
        line += _SYNC[v["exabgp"]["in_sync"]]
        if v["detail"]:
            line += f"\n      {v['detail']}"
        out.append(line)
    if doc["exabgp_other_prefixes"]:
        out += ["", "ExaBGP holds (or may hold) prefixes of no VIP: " + ", ".join(doc["exabgp_other_prefixes"])]
    return "\n".join(out)


def cmd_agent_status(socket_path: str, as_json: bool) -> int:
    doc = fetch(socket_path)
    try:
        text = json.dumps(doc, indent=2) if as_json else render(doc)
    except (KeyError, TypeError, ValueError) as exc:
        raise ApiError(f"{socket_path}: the status is not what this anycastctl expects ({type(exc).__name__}: "
                       f"{exc}): is the agent of the same version?", Exit.BAD_ANSWER) from None
    print(text)
    return Exit.OK
