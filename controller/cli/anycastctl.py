# PYTHON_ARGCOMPLETE_OK  (argcomplete's marker: `eval "$(register-python-argcomplete anycastctl)"`)
"""``anycastctl``: the operator's CLI.

    anycastctl validate PATH [PATH ...]   check agent configs / a controller directory, offline
    anycastctl status                     config revision and errors, POPs, alarms
    anycastctl plan [--pop POP]           the plans being served
    anycastctl diff [--config DIR]        what DIR's desired state would change, per POP, and its
                                          blast radius (exit 2: changes, 0: none, 1: error)
    anycastctl apply --confirm REV --reason WHY   roll out a config revision held over the budget
    anycastctl explain VIP                per POP: the decision and why
    anycastctl drain POP | undrain POP
    anycastctl dial REGION PCT --why TEXT [--by WHO] [--force] | dial REGION --config | dial (list)
    anycastctl agent status               on a POP: the local agent's sessions, VIPs, plan, controller link

The commands that talk to the controller take --url (default $ANYCAST_CONTROLLER_URL or
http://127.0.0.1:9800) and --token-file (default: $ANYCAST_OPERATOR_TOKEN). Every command
takes --json. Exit codes: ``conventions.Exit`` (0 ok, 1 error, 2 changes from ``diff``,
3 not found, 4 unreachable, 5 not the controller's answer,
6 token refused, 64 usage); no input ends in a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import argcomplete

from ..config.agent import load_agent_config
from ..config.desired import load_desired
from ..config.errors import ConfigError
from ..config.desired_model import ChangePolicy, with_dials
from ..policy import change
from ..policy.diff import Change, diff_plans
from ..policy.planner import plan
from ..server.snapshot import reports_from_snapshot
from ..policy.model import PlannerState
from ..server.revision import checkout_at
from ..server.store import planner_from_json
from .agent_status import DEFAULT_SOCKET, cmd_agent_status
from .conventions import Exit, new_parser
from .operator_api import ApiError, OperatorApi, check_url, operator_token

DEFAULT_URL = "http://127.0.0.1:9800"


def _url(text: str) -> str:
    try:
        return check_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _parser() -> argparse.ArgumentParser:
    p = new_parser("anycastctl", "Operate the BGP anycast controller")
    sub = p.add_subparsers(dest="command", required=True)
    default_url = os.environ.get("ANYCAST_CONTROLLER_URL", DEFAULT_URL)
    v = sub.add_parser("validate", help="check an agent config file or a controller config directory; "
                                        "lists every error with its path")
    v.add_argument("paths", nargs="+", metavar="PATH")
    v.add_argument("--json", action="store_true", help="machine-readable output")
    a = sub.add_parser("agent", help="the POP agent running on this host (its local socket, no controller)")
    asub = a.add_subparsers(dest="agent_command", required=True)
    ast = asub.add_parser("status", help="BGP sessions, every VIP's decision, reason and attributes, what ExaBGP "
                                         "holds, the plan and the controller link")
    ast.add_argument("--socket", default=DEFAULT_SOCKET,
                     help=f"the agent's status socket, STATE_DIR/agent.sock (default {DEFAULT_SOCKET})")
    ast.add_argument("--json", action="store_true", help="machine-readable output")
    for name, help_ in (("status", "the controller's config revision, POPs, report ages and alarms"),
                        ("plan", "the plans the controller serves"),
                        ("diff", "what a config directory would change at which POPs, against the live plans"),
                        ("explain", "why a VIP is (not) announced at each POP"),
                        ("apply", "confirm a config revision held over the blast-radius budget: it rolls "
                                  "out in waves"),
                        ("drain", "drain a POP: less preferred first, then withdrawn"),
                        ("undrain", "end a POP's drain"),
                        ("dial", "an origin region's traffic dial, 0-100 (0 drains the region without touching "
                                 "BGP); without arguments, every region's")):
        c = sub.add_parser(name, help=help_)
        c.add_argument("--url", type=_url, default=default_url,
                       help=f"the controller's API, http(s)://HOST:PORT (default: $ANYCAST_CONTROLLER_URL, "
                            f"else {DEFAULT_URL}; now {default_url})")
        c.add_argument("--token-file", help="file holding the operator token (else $ANYCAST_OPERATOR_TOKEN)")
        c.add_argument("--json", action="store_true", help="machine-readable output")
        if name == "plan":
            c.add_argument("--pop", help="only this POP")
        if name == "diff":
            c.add_argument("--config", help="the desired-state directory to compare (default: the controller's; "
                                            "with --against: the current directory)")
            c.add_argument("--against", metavar="REV",
                           help="offline: compare with the same directory at git revision REV (e.g. main) "
                                "instead of the live plans; no controller needed (a CI step)")
            c.add_argument("--detailed-exitcode", action="store_true",
                           help="accepted for old scripts; diff always exits 2 on changes, 0 on none")
            c.add_argument("--budget", action="store_true",
                           help="exit 1 if the change is over the blast-radius budget (change: in controller.yaml "
                                "of the revision it replaces), as the controller would hold it")
        if name == "apply":
            c.add_argument("--confirm", metavar="REV", required=True,
                           help="the held revision (as `anycastctl status` names it)")
            c.add_argument("--reason", required=True, help="why: recorded with the confirm")
            c.add_argument("--by", default=_who(), help=f"who confirms (default $USER@host: {_who()})")
        if name == "explain":
            c.add_argument("vip")
        if name in ("drain", "undrain"):
            c.add_argument("pop")
        if name == "dial":
            c.add_argument("region", nargs="?")
            c.add_argument("pct", nargs="?", type=int, help="0-100 of the region's weight")
            c.add_argument("--why", help="why (recorded with the dial; required to set one)")
            c.add_argument("--by", default=os.environ.get("SUDO_USER") or os.environ.get("USER") or "operator",
                           help="who sets it (default: $SUDO_USER, else $USER)")
            c.add_argument("--config", dest="to_config", action="store_true",
                           help="hand the region's dial back to the config (controller.yaml dials)")
            c.add_argument("--force", action="store_true",
                           help="set it even if it moves the traffic of more than change.max_withdraw_fraction "
                                "of the announced (VIP, POP) pairs (refused otherwise, naming them)")
    return p


def _who() -> str:
    import socket
    return f"{os.environ.get('USER') or os.environ.get('LOGNAME') or 'unknown'}@{socket.gethostname()}"


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
    return Exit.OK if all(r["ok"] for r in results) else Exit.ERROR


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    argcomplete.autocomplete(parser)
    args = parser.parse_args(argv)
    try:
        return int(_run(args))
    except (ApiError, ConfigError, ValueError) as exc:
        print(f"anycastctl {args.command}: {exc}", file=sys.stderr)
        return int(exc.code if isinstance(exc, ApiError) else Exit.ERROR)
    except Exception as exc:  # noqa: BLE001 - a bug: one line for the report, never a traceback
        print(f"anycastctl {args.command}: internal error {type(exc).__name__}: {exc} "
              "(please report it with the command line)", file=sys.stderr)
        return int(Exit.INTERNAL)


def _run(args: argparse.Namespace) -> int:
    if args.command == "validate":
        return cmd_validate(args.paths, args.json)
    if args.command == "agent":
        return cmd_agent_status(args.socket, args.json)
    if args.command == "diff" and args.against:
        return cmd_diff_against(args)
    api = OperatorApi(args.url, operator_token(args.token_file))
    try:
        return int(COMMANDS[args.command](api, args))
    except (KeyError, TypeError, AttributeError) as exc:
        # JSON of another shape: another program at --url, or a controller of another version.
        raise ApiError(f"the answer from {args.url} is not what this anycastctl expects ({type(exc).__name__}: "
                       f"{exc}): is --url the controller, of the same version?", Exit.BAD_ANSWER) from None


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def _emit(args: argparse.Namespace, data: Any, human: str) -> int:
    print(json.dumps(data, indent=2) if args.json else human)
    return 0


def cmd_status(api: OperatorApi, args: argparse.Namespace) -> int:
    st = api.call("GET", "/v1/status")
    c = st["config"]
    out = [f"config: {c['directory']} revision {c['revision']}"]
    if c["last_error"]:
        out.append(f"CONFIG ERROR in revision {c['last_error_revision']} (still serving {c['revision']}):")
        out += ["  " + line for line in c["last_error"].splitlines()]
    if stale := (c.get("watch") or {}).get("stale_git_lock"):  # (absent from older controllers)
        out.append(f"STALE GIT LOCK {stale}: left by a git killed half-way; reloads no longer wait for it "
                   "(remove it if no git runs in the checkout)")
    out += _ha_lines(st.get("ha"))  # HA on etcd only
    persistence = st.get("persistence")  # absent from controllers older than the journal
    if persistence and not persistence["ok"]:
        out.append(f"PERSISTENCE FAILING in {persistence['state_dir']}: {persistence['last_error']}")
        out.append("  drains and undrains are refused until the state can be saved again")
    if persistence and persistence["recovered_without"]:
        out.append("STATE RECOVERED at start without (check the drains below):")
        out += ["  " + problem for problem in persistence["recovered_without"]]
    ch = st.get("change")  # absent from controllers older than staged rollouts
    if ch and ch["phase"] != "steady":
        out.append(f"CONFIG CHANGE {ch['phase'].upper()}: revision {ch['target']} (applied everywhere: "
                   f"{ch['applied_revision']})")
        out.append(f"  {ch['detail']}")
        if ch["phase"] == "rolling":
            out.append(f"  wave {ch['wave'] + 1} of {len(ch['waves'])}: {', '.join(ch['waves'][ch['wave']])}; "
                       f"withdrawn so far at {', '.join(ch['rolled'])}")
        if ch["phase"] in ("held", "rolled_back"):
            out.append(f"  to roll it out: anycastctl apply --confirm {ch['target']} --reason '...'; "
                       "or commit a fix (a newer revision replaces it)")
    if ch and ch.get("confirmed"):
        c2 = ch["confirmed"]
        out.append(f"  revision {c2['revision']} confirmed by {c2['by']}: {c2['reason']}")
    rows = [[p["pop"], str(p["plan_generation"]),
             "never" if p["report_age"] is None else f"{p['report_age']:.1f}s",
             str(p["vips_wanted"]), str(p["safety_holds"]), "yes" if p["drained_since"] else "-"]
            for p in st["pops"]]
    out += ["", _table(rows, ["POP", "PLAN GEN", "REPORT AGE", "VIPS WANTED", "SAFETY HOLDS", "DRAINED"])]
    out += ["", *[f"{v['vip']}: {v['note']}" for v in st["vips"]]]
    out += ["", "alarms: none" if not st["alarms"] else "ALARMS:"]
    out += [f"  {a['kind']} {a['vip']}: {a['detail']}" for a in st["alarms"]]
    return _emit(args, st, "\n".join(out))


def _ha_lines(ha: dict[str, Any] | None) -> list[str]:
    """Leader, members and etcd's health, as ``status`` shows them (HA on etcd)."""
    if not ha:
        return []
    leader = ha["leader"]
    if ha["role"] == "leader":
        out = [f"ha: {ha['name']} is the LEADER (lease {ha['lease_ttl']}s)"]
    elif ha["role"] == "starting":
        out = [f"ha: {ha['name']} has just become the leader and is loading the state from etcd"]
    elif leader is None:
        out = [f"ha: NO LEADER: {ha['name']} is a follower and no controller leads (nothing is planned or "
               "changed; agents keep their plans)"]
    else:
        out = [f"ha: {ha['name']} is a follower; the leader is {leader['name']} at {leader['url']} "
               "(plans, drains and explanations are there)"]
    out.append("  members: " + (", ".join(f"{m['name']} {m['url']}" for m in ha["members"]) or "none seen"))
    for endpoint, h in ha["endpoints"].items():
        out.append(f"  etcd {endpoint}: " + ("ok" if h["ok"] else "not tried yet" if h["ok"] is None
                                             else f"DOWN: {h['error']}"))
    if ha["last_error"]:
        out.append(f"  ETCD ERROR: {ha['last_error']}")
    return out


def cmd_plan(api: OperatorApi, args: argparse.Namespace) -> int:
    plans = api.call("GET", "/v1/snapshot")["plans"]
    if args.pop:
        if args.pop not in plans:
            raise ApiError(f"unknown POP {args.pop!r}", Exit.NOT_FOUND)
        plans = {args.pop: plans[args.pop]}
    rows = [[pop, vip, "announce" if i["wanted"] else "withdraw", i["active_origin"], i["reason"],
             "yes" if i["drain"] else "-", "yes" if i["safety_hold"] else "-"]
            for pop, items in sorted(plans.items()) for vip, i in sorted(items.items())]
    return _emit(args, plans, _table(rows, ["POP", "VIP", "PLAN", "ORIGIN", "REASON", "DRAIN", "HOLD"]))


def cmd_diff(api: OperatorApi, args: argparse.Namespace) -> int:
    snap = api.call("GET", "/v1/snapshot")
    status = api.call("GET", "/v1/status")
    directory = args.config or status["config"]["directory"]
    desired = load_desired(directory, "proposed")
    # The operator's dials stay over any revision (anycastctl dial): planned with them, so a
    # dial is not shown as a change the config makes.
    proposed = plan(with_dials(desired, snap.get("dials", {})), reports_from_snapshot(snap), snap["drains"],
                    snap["now"], planner_from_json(snap["planner"]))
    changes = diff_plans(snap["plans"], proposed)
    announced = frozenset((vip, pop) for pop, items in snap["plans"].items() for vip, i in items.items() if i["wanted"])
    published = frozenset((vip, pop) for pop, items in snap["plans"].items() for vip in items)
    budget = status.get("change", {}).get("budget")
    policy = ChangePolicy(**budget) if budget else ChangePolicy()
    return _diff_out(args, f"{directory} against the live plans (revision {snap['revision']})", changes, announced,
                     change.blast_radius(announced, published, desired), policy)


def _diff_out(args: argparse.Namespace, title: str, changes: list[Change], announced: frozenset[change.Pair],
              new: change.BlastRadius, policy: ChangePolicy) -> int:
    """Print the changes and the blast radius; the exit code (2 changes, 0 none, 1 over the
    budget with --budget)."""
    radius = new
    over = radius.over_budget(policy)
    per_pop: dict[str, dict[str, int]] = {}
    for c in changes:
        row = per_pop.setdefault(c.pop, {"withdrawn": 0, "announced": 0, "moved": 0})
        key = {"withdraw": "withdrawn", "announce": "announced", "move": "moved"}.get(c.action)
        if key:
            row[key] += 1
    now_at: dict[str, int] = {}
    for _, pop in announced:
        now_at[pop] = now_at.get(pop, 0) + 1
    pops = {pop: {**row, "announced_now": now_at.get(pop, 0),
                  "share_withdrawn": round(row["withdrawn"] / now_at[pop], 4) if now_at.get(pop) else 0.0}
            for pop, row in sorted(per_pop.items())}
    blast: dict[str, Any] = {"announced_now": radius.announced, "withdrawn": len(radius.withdrawn),
             "share_withdrawn": round(radius.fraction, 4), "removed_vips": list(radius.removed_vips),
             "announced": sum(r["announced"] for r in per_pop.values()),
             "moved": sum(r["moved"] for r in per_pop.values()),
             "per_pop": pops,
             "over_budget": over,
             "budget": {"max_withdraw_fraction": policy.max_withdraw_fraction,
                        "max_removed_vips": policy.max_removed_vips}}
    data = {"changes": [{"pop": c.pop, "vip": c.vip, "action": c.action, "detail": c.detail} for c in changes],
            "blast_radius": blast}
    lines = [f"{title}:"]
    if not changes:
        lines.append("no change at any POP")
    else:
        lines.append(_table([[c.pop, c.vip, c.action, c.detail] for c in changes], ["POP", "VIP", "CHANGE", "DETAIL"]))
        lines += ["", f"blast radius: withdraws {blast['withdrawn']} of {radius.announced} announced (VIP, POP) pairs "
                      f"({radius.fraction:.0%}), announces {blast['announced']}, moves {blast['moved']}"]
        lines.append(_table([[pop, str(r["announced_now"]), str(r["withdrawn"]), str(r["announced"]), str(r["moved"]),
                              f"{r['share_withdrawn']:.0%}"] for pop, r in pops.items()],
                            ["POP", "ANNOUNCED NOW", "WITHDRAWN", "ANNOUNCED", "MOVED", "SHARE WITHDRAWN"]))
        lines.append(f"OVER THE BUDGET: {over} (the controller holds it until `anycastctl apply --confirm REV`)"
                     if over else "within the budget (the controller rolls withdrawals and moves out in waves)")
    _emit(args, data, "\n".join(lines))
    if over and args.budget:
        print(f"anycastctl diff: over the blast-radius budget: {over}", file=sys.stderr)
        return Exit.ERROR
    return Exit.CHANGES if changes else Exit.OK


def cmd_diff_against(args: argparse.Namespace) -> int:
    """Desired state in the working tree vs. at REV, planned with no health reports (every
    POP unknown, so each announces by its own checks): what the change itself does."""
    directory = args.config or "."
    new = load_desired(directory, "working-tree")
    with tempfile.TemporaryDirectory() as tmp:
        old = load_desired(checkout_at(directory, args.against, tmp), args.against)
    before = plan(old, {}, {}, 0.0, PlannerState.initial())
    after = plan(new, {}, {}, 0.0, PlannerState.initial())
    current = {pop: {vip: {"wanted": i.wanted, "active_origin": i.active_origin, "drain": i.drain}
                     for vip, i in items.items()} for pop, items in before.pops.items()}
    changes = diff_plans(current, after)
    announced = frozenset((vip, pop) for pop, items in before.pops.items() for vip, i in items.items() if i.wanted)
    # The budget of the revision replaced: a change cannot loosen the budget that judges it.
    return _diff_out(args, f"{directory}: working tree against {args.against}", changes, announced,
                     change.blast_radius(announced, change.pairs(old), new), old.change)


def cmd_apply(api: OperatorApi, args: argparse.Namespace) -> int:
    r = api.call("POST", "/v1/change/confirm", {"revision": args.confirm, "by": args.by, "reason": args.reason})
    if r["phase"] == "rolling":
        human = (f"revision {r['target']} confirmed: rolling out in {len(r['waves'])} wave(s), first at "
                 f"{', '.join(r['waves'][0])} ({r['bake']:.0f}s bake each); follow with `anycastctl status`")
    else:
        human = f"revision {r['target']} confirmed: applied at every POP"
    return _emit(args, r, human)


def cmd_explain(api: OperatorApi, args: argparse.Namespace) -> int:
    e = api.call("GET", f"/v1/explain/{args.vip}")
    out = [f"{e['vip']} ({e['address']}){'' if e['enabled'] else ' DISABLED'}: {e['note']}"]
    for p in e["pops"]:
        plan_word = "announce" if p["wanted"] else "withdraw"
        now = {True: "announced", False: "not announced", None: "unknown"}[p["announced"]]
        flags = (" [drain]" if p["drain"] else "") + (" [SAFETY HOLD]" if p["safety_hold"] else "")
        via = " / ".join(f"{r} {w}" for r, w in p.get("weights", [])) or p["active_origin"]
        out.append(f"  {p['pop']}: plan {plan_word} via {via}, reason {p['reason']}{flags}; "
                   f"agent reports {now}")
        out.append(f"      {p['explanation']}")
    out += [f"  ALARM {a['kind']}: {a['detail']}" for a in e["alarms"]]
    return _emit(args, e, "\n".join(out))


def cmd_drain(api: OperatorApi, args: argparse.Namespace) -> int:
    r = api.call("POST" if args.command == "drain" else "DELETE", f"/v1/drains/{args.pop}")
    if args.command == "drain":
        human = (f"{r['pop']}: draining: less preferred now, withdrawn after {r['drain_time']:.0f}s"
                 if r["changed"] else f"{r['pop']}: already drained")
    else:
        human = f"{r['pop']}: undrained" if r["changed"] else f"{r['pop']}: was not drained"
    return _emit(args, r, human)


def cmd_dial(api: OperatorApi, args: argparse.Namespace) -> int:
    if args.region is None:
        r = api.call("GET", "/v1/dials")
        rows = [[region, str(d["pct"]), str(d["config"]),
                 f"{d['operator']['by']}: {d['operator']['why']}" if d["operator"] else "-"]
                for region, d in r["dials"].items()]
        return _emit(args, r, _table(rows, ["REGION", "DIAL", "CONFIG", "SET BY"]))
    if args.to_config:
        r = api.call("DELETE", f"/v1/dials/{args.region}" + ("?force=true" if args.force else ""))
    else:
        if args.pct is None or not args.why:
            print("anycastctl dial REGION PCT --why TEXT (or --config)", file=sys.stderr)
            return 2
        r = api.call("POST", f"/v1/dials/{args.region}", {"pct": args.pct, "by": args.by, "why": args.why,
                                                          "force": args.force})
    human = f"{r['region']}: dial {r['pct']}" + ("" if r["changed"] else " (unchanged)")
    return _emit(args, r, human)


COMMANDS: dict[str, Callable[[OperatorApi, argparse.Namespace], int]] = {
    "status": cmd_status, "plan": cmd_plan, "diff": cmd_diff, "explain": cmd_explain, "apply": cmd_apply,
    "drain": cmd_drain, "undrain": cmd_drain, "dial": cmd_dial,
}


if __name__ == "__main__":
    sys.exit(main())
