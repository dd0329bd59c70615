"""``anycast-controller``: the central controller.

    anycast-controller --config-dir /etc/anycast/controller [--state-dir DIR] [--listen ADDR:PORT]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import sys
from collections.abc import Sequence

from .. import logs
from ..config.desired import read_ha
from ..config.errors import ConfigError
from ..config.desired_model import StoreKind
from ..server import daemon
from ..server.daemon import ListenFailed, Watcher, serve
from ..server.etcd import IncompatibleLayout, fetch_desired
from ..server.looplag import MIN_EVERY
from ..server.store import PersistenceError, StateDirLocked, StateUnreadable
from .conventions import Exit, add_log_level, new_parser


# The cyclic GC's young generations collected less often: with 10,000 VIPs x 50 POPs the
# controller holds millions of objects and each planning pass makes millions more, and the
# default (700, 10, 10) spends more time in the collector than in the planner (bench/).
GC_THRESHOLD = (100_000, 50, 100)


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not ADDRESS:PORT (e.g. 127.0.0.1:9800, [::1]:9800)")
    return host.strip("[]"), int(port)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 10:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0 to 10")
    return value


def _lag_every(text: str) -> float:
    """--loop-lag-every: 0 (off) or 0.005-10 s (below that the timer would be due all the time:
    the loop spinning, a minute's samples without bound)."""
    value = _seconds(text)
    if 0 < value < MIN_EVERY:
        raise argparse.ArgumentTypeError(f"{text!r}: sample the loop no more often than every {MIN_EVERY} s (or 0: off)")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    p = new_parser("anycast-controller", "BGP anycast central controller")
    p.add_argument("--config-dir", "-c", required=True, help="the desired-state directory (a git checkout)")
    p.add_argument("--state-dir", help="override state_dir from controller.yaml")
    p.add_argument("--listen", type=_host_port, help="override listen (ADDRESS:PORT)")
    p.add_argument("--metrics-listen", type=_host_port, help="override metrics_listen (ADDRESS:PORT)")
    p.add_argument("--name", help="HA (ha.store: etcd): this controller's name among them (default: the host name)")
    p.add_argument("--advertise-url", help="HA: the URL agents and operators reach this controller at "
                   "(default: http://LISTEN)")
    p.add_argument("--loop-lag-every", type=_lag_every, default=daemon.LOOP_LAG_EVERY, metavar="SECONDS",
                   help="sample the event loop's lag this often (anycast_controller_event_loop_lag_seconds, "
                   "/v1/status event_loop; default %(default)s; 0: off; at least 0.005)")
    add_log_level(p)
    args = p.parse_args(argv)
    daemon.LOOP_LAG_EVERY = args.loop_lag_every
    gc.set_threshold(*GC_THRESHOLD)
    daemon.FREEZE_HEAP = True  # (server/daemon.py, _freeze_heap)
    logs.setup("anycast-controller", args.log_level)
    watcher = None
    try:
        watcher = Watcher(args.config_dir, args.state_dir)
        # HA: a checkout that does not load, on a host without a kept copy, starts on etcd's.
        early = read_ha(args.config_dir)
        if early is not None and early.store == StoreKind.ETCD:
            watcher.fetch_kept = lambda: fetch_desired(early)
        ha = watcher.load_at_start().ha
        if ha is not None and ha.store == StoreKind.ETCD:
            from ..server.ha import serve_ha

            return asyncio.run(serve_ha(watcher, ha, args.name, args.advertise_url, args.listen, args.metrics_listen))
        return asyncio.run(serve(watcher, args.listen, args.metrics_listen))
    except ConfigError as exc:  # the checkout does not load and no last good state was ever kept
        print(exc.summary(), file=sys.stderr)
        return 2
    except (StateDirLocked, StateUnreadable, PersistenceError, IncompatibleLayout) as exc:
        print(f"anycast-controller: {exc}", file=sys.stderr)
        return Exit.ERROR
    except ListenFailed as exc:  # another process has the port: nothing was served, the state is untouched
        print(f"anycast-controller: {exc}", file=sys.stderr)
        return Exit.UNAVAILABLE
    finally:
        if watcher is not None:
            watcher.close()  # (its copy of the git index, whatever ended the run)


if __name__ == "__main__":
    sys.exit(main())
