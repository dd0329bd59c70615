"""The three-POP lab with HA controllers: three controllers and a three-member etcd
cluster, each in its own lab node on the management network.

    mgmt bridge (in ``ctl``, 192.0.2.0/24)
      ctl-a 192.0.2.101  ctl-b 192.0.2.102  ctl-c 192.0.2.103     anycast-controller (ha.store: etcd)
      etcd-a 192.0.2.111 etcd-b 192.0.2.112 etcd-c 192.0.2.113    etcd (Debian's etcd-server)
      pop-X 192.0.2.1N                                            agents: controller.urls = the three

Everything else is lab.fleet's: transit routers, POP routers, agents, origins, clients.
``f.status()``, ``f.explain()``, ``f.plan()`` and the metrics come from whichever
controller leads now, so lab.scenarios' checks (assert_clean) work unchanged.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from .etcd import EtcdMember
from .fleet import AGENT_METRICS_PORT, CONTROLLER_METRICS_PORT, CONTROLLER_PORT, LAB_TOKENS, Fleet
from .multi_pop import bridge_port
from .tls import TRUST_LAST_ARG
from .netns import Lab, LabError
from .nodes import lab_env, scrape
from .topology import Pop, Topology

CONTROLLERS = {"ctl-a": "192.0.2.101", "ctl-b": "192.0.2.102", "ctl-c": "192.0.2.103"}
ETCD_MEMBERS = {"etcd-a": "192.0.2.111", "etcd-b": "192.0.2.112", "etcd-c": "192.0.2.113"}
# ha.lease_ttl: the production default. A leader rides out lease_ttl - margin (4 s here)
# without an answer from etcd, which must cover etcd electing a new raft leader when one
# member dies (ETCD_ELECTION_MS, at most twice that, plus a vote) on a machine as loaded as
# CI's. With 3 s (a 2.4 s ride-out, less the 0.6 s since the last keep-alive) a CI run saw
# ha4's leader step down while etcd was still electing (its term ended, plans moved on).
LEASE_TTL = 5
ETCD_ELECTION_MS = 500
ETCD_CLIENT_PORT, ETCD_PEER_PORT = 2379, 2380
_ = AGENT_METRICS_PORT


def controller_url(name: str) -> str:
    return f"https://{CONTROLLERS[name]}:{CONTROLLER_PORT}"  # (the certificate names every controller)


def etcd_endpoints() -> list[str]:
    return [f"http://{a}:{ETCD_CLIENT_PORT}" for a in ETCD_MEMBERS.values()]


class HaFleet(Fleet):
    def __init__(self, lab: Lab, topo: Topology, *, controller_edit: Callable[[Path], None] | None = None,
                 prometheus: bool = False) -> None:
        def edit(config_dir: Path) -> None:
            if controller_edit is not None:
                controller_edit(config_dir)
            path = config_dir / "controller.yaml"
            data = yaml.safe_load(path.read_text())
            data["ha"] = {"store": "etcd", "endpoints": etcd_endpoints(), "lease_ttl": LEASE_TTL,
                          "request_timeout": 0.5}
            path.write_text(yaml.safe_dump(data, sort_keys=False))

        super().__init__(lab, topo, controller_edit=edit, prometheus=prometheus)
        self.etcd: dict[str, EtcdMember] = {}
        self.ctls: dict[str, subprocess.Popen[Any]] = {}

    # --- building -----------------------------------------------------------------------------
    def build_network(self) -> None:
        super().build_network()
        mgmt = self.nodes[self.topo.controller_node]
        for name, addr in {**CONTROLLERS, **ETCD_MEMBERS}.items():
            ns = self.nodes[name] = self.lab.netns(name)
            bridge_port(ns, "eth-mgmt", mgmt, f"p-{name}", f"{addr}/24")

    def controller_addresses(self) -> tuple[str, ...]:
        return tuple(CONTROLLERS.values())

    def start_controller(self) -> None:
        """The etcd cluster (if not running), then every controller not running."""
        if not self.etcd:
            self.start_etcd()
        for name in CONTROLLERS:
            if name not in self.ctls or self.ctls[name].poll() is not None:
                self.start_one(name)
        self.controller = next(iter(self.ctls.values()))

    def start_etcd(self) -> None:
        cluster = ",".join(f"{n}=http://{a}:{ETCD_PEER_PORT}" for n, a in ETCD_MEMBERS.items())
        for name, addr in ETCD_MEMBERS.items():
            wd = self.lab.workdir(name)
            self.etcd[name] = EtcdMember(name, str(wd / "data"), f"http://{addr}:{ETCD_CLIENT_PORT}",
                                         f"http://{addr}:{ETCD_PEER_PORT}", cluster, log_path=str(wd / "etcd.log"),
                                         node=self.nodes[name], election_ms=ETCD_ELECTION_MS)
            self.etcd[name].start()
        deadline = time.monotonic() + 120
        while not all(self.etcd_healthy(n) for n in ETCD_MEMBERS):
            if time.monotonic() > deadline or any(not m.alive() for m in self.etcd.values()):
                raise LabError("etcd did not start: " + " | ".join(m.log_tail()[-500:] for m in self.etcd.values()))
            time.sleep(0.2)

    def etcd_healthy(self, name: str) -> bool:
        m = self.etcd[name]
        code = ("import urllib.request,sys,json\n"
                f"sys.exit(0 if json.loads(urllib.request.urlopen({m.client_url + '/health'!r},timeout=1).read())"
                "['health']=='true' else 1)")
        return self.nodes[name].run([sys.executable, "-c", code], check=False, timeout=30).returncode == 0

    def etcd_raft_leader(self) -> str | None:
        """The member that leads etcd's raft group now (None: none answers or agrees)."""
        code = ("import urllib.request,sys,json\n"
                "r=urllib.request.Request(sys.argv[1]+'/v3/maintenance/status',data=b'{}',method='POST')\n"
                "d=json.loads(urllib.request.urlopen(r,timeout=1).read())\n"
                "print(d['header']['member_id']==d['leader'])")
        for name, m in self.etcd.items():
            r = self.nodes[name].run([sys.executable, "-c", code, m.client_url], check=False, timeout=30)
            if r.returncode == 0 and r.stdout.strip() == "True":
                return name
        return None

    def kill_etcd(self, name: str) -> None:
        self.etcd[name].kill()

    def restart_etcd(self, name: str) -> None:
        """Start a killed member again on its data (it rejoins the cluster)."""
        m = self.etcd[name]
        m.extra = ("--initial-cluster-state", "existing")
        m.start()

    def start_one(self, name: str) -> None:
        exe = str(Path(sys.executable).parent / "anycast-controller")
        wd = self.lab.workdir(name)
        log = open(wd / "controller.log", "ab")  # noqa: SIM115 - owned by the process
        self.ctls[name] = self.nodes[name].popen(
            [exe, "--config-dir", str(self.config_dir), "--state-dir", str(wd / "state"),
             "--listen", f"{CONTROLLERS[name]}:{CONTROLLER_PORT}", "--metrics-listen", f"0.0.0.0:{CONTROLLER_METRICS_PORT}",
             "--name", name, "--advertise-url", controller_url(name)],
            stdout=log, stderr=subprocess.STDOUT, env=lab_env())

    def kill_controller(self, name: str) -> None:
        """SIGKILL, by PID (no resignation: its lease must run out)."""
        proc = self.ctls.pop(name)
        self.nodes[name].terminate(proc.pid, grace=0.0, sig=signal.SIGKILL)
        alive = [p for p in self.ctls.values() if p.poll() is None]
        self.controller = alive[0] if alive else None

    def stop_controller(self) -> None:
        for name in list(self.ctls):
            self.nodes[name].terminate(self.ctls.pop(name).pid)
        self.controller = None

    def controller_log(self) -> str:
        out = []
        for name in CONTROLLERS:
            path = self.lab.workdir(name) / "controller.log"
            if path.exists():
                out += [f"[{name}] {line}" for line in path.read_text(errors="replace").splitlines()[-30:]]
        return "\n".join(out)

    def agent_config(self, pop: Pop) -> Path:
        path = super().agent_config(pop)
        data = yaml.safe_load(path.read_text())
        del data["controller"]["url"]
        data["controller"]["urls"] = [controller_url(n) for n in CONTROLLERS]
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    # --- observing ------------------------------------------------------------------------------
    def api(self, name: str, method: str, path: str, token_file: Path) -> tuple[int, Any] | None:
        """``method path`` on controller ``name`` from inside its node: (HTTP status, JSON),
        None if it does not answer."""
        code = (TRUST_LAST_ARG + "import json,urllib.request,urllib.error\n"
                "req=urllib.request.Request(sys.argv[1],method=sys.argv[3],"
                "headers={'Authorization':'Bearer '+open(sys.argv[2]).read().strip()})\n"
                "try: r=urllib.request.urlopen(req,timeout=10,context=CTX); print(r.status); sys.stdout.write(r.read().decode())\n"
                "except urllib.error.HTTPError as e: print(e.code); sys.stdout.write(e.read().decode())\n"
                "except OSError: sys.exit(3)\n")
        r = self.nodes[name].run([sys.executable, "-c", code, controller_url(name) + path, str(token_file), method,
                                  str(self.tls.ca)], check=False, timeout=30)
        if r.returncode != 0:
            return None
        status, _, body = r.stdout.partition("\n")
        return int(status), json.loads(body)

    def ha_status(self, name: str) -> dict[str, Any] | None:
        got = self.api(name, "GET", "/v1/status", LAB_TOKENS / "operator.token")
        return got[1]["ha"] if got and got[0] == 200 else None

    def leader(self) -> str | None:
        """The controller that says it leads now (None: none)."""
        for name in self.ctls:
            s = self.ha_status(name)
            if s is not None and s["role"] == "leader":
                return name
        return None

    def leaders(self) -> list[str]:
        return [n for n in list(self.ctls) if (s := self.ha_status(n)) is not None and s["role"] == "leader"]

    def controller_api(self, path: str, token_file: Path) -> Any:
        """GET ``path`` from the leader (None if no controller leads or answers)."""
        leader = self.leader()
        if leader is None:
            return None
        got = self.api(leader, "GET", path, token_file)
        if got is None or got[0] == 503:
            return None
        if got[0] != 200:
            raise LabError(f"controller GET {path}: HTTP {got[0]} {got[1]}")
        return got[1]

    def operator(self, method: str, path: str) -> dict[str, Any]:
        """An operator action at the leader (LabError if none leads or it refuses)."""
        leader = self.leader()
        got = self.api(leader, method, path, LAB_TOKENS / "operator.token") if leader else None
        if got is None or got[0] != 200:
            raise LabError(f"{method} {path} at the leader {leader}: {got}")
        body: dict[str, Any] = got[1]
        return body

    def watch_leaders(self) -> LeaderWatch:
        return LeaderWatch(self)

    def controller_metrics(self, name: str | None = None) -> str:
        name = name or self.leader()
        return scrape(self.nodes[name], CONTROLLER_METRICS_PORT) if name else ""


_SAMPLER = TRUST_LAST_ARG + """
import json, sys, time, urllib.request, concurrent.futures
urls, token, out = json.loads(sys.argv[1]), open(sys.argv[2]).read().strip(), open(sys.argv[3], "a")
def role(url):
    try:
        req = urllib.request.Request(url + "/v1/status", headers={"Authorization": "Bearer " + token})
        return json.loads(urllib.request.urlopen(req, timeout=0.5, context=CTX).read())["ha"]["role"]
    except Exception:
        return None
pool = concurrent.futures.ThreadPoolExecutor(len(urls))
while True:
    t = time.time()
    roles = dict(zip(urls, pool.map(role, urls.values())))
    out.write(json.dumps({"t": t, "done": time.time(), "roles": roles}) + "\\n"); out.flush()
    time.sleep(0.02)
"""


class LeaderWatch:
    """Every controller's role, asked of all three at once about every 20 ms from the
    management node (one process, so the samples are not paced by process starts)."""

    def __init__(self, f: HaFleet) -> None:
        self.f = f
        self.path = f.lab.workdir(f.topo.controller_node) / "leaders.jsonl"
        self.proc: subprocess.Popen[Any] | None = None

    def __enter__(self) -> LeaderWatch:
        self.path.unlink(missing_ok=True)
        urls = json.dumps({n: controller_url(n) for n in CONTROLLERS})
        self.proc = self.f.nodes[self.f.topo.controller_node].popen(
            [sys.executable, "-c", _SAMPLER, urls, str(LAB_TOKENS / "operator.token"), str(self.path),
             str(self.f.tls.ca)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=lab_env())
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.f.nodes[self.f.topo.controller_node].terminate(self.proc.pid)

    def samples(self) -> list[tuple[float, float, list[str]]]:
        """(asked at, answered by, the controllers that said they lead), in order."""
        out = []
        for line in self.path.read_text().splitlines() if self.path.exists() else ():
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue
            out.append((float(d["t"]), float(d["done"]), sorted(n for n, r in d["roles"].items() if r == "leader")))
        return out
