"""First plan, 50 full reports, idle, steady window(s); RSS + CPU + (optionally) heap dumps."""
import asyncio, json, os, sys, time, subprocess, tempfile, argparse
from pathlib import Path
sys.path.insert(0, os.getcwd())
from bench import controller_scale as cs
from bench.report import load_average, summary

ap = argparse.ArgumentParser()
ap.add_argument("--files", type=int, default=1)
ap.add_argument("--trace", type=int, default=0)
ap.add_argument("--out", required=True)
ap.add_argument("--vips", type=int, default=10000)
ap.add_argument("--pops", type=int, default=50)
ap.add_argument("--steady", type=float, default=20.0)
ap.add_argument("--pyspy", default="")
args = ap.parse_args()

class TDaemon(cs.Daemon):
    def __init__(self, config_dir, work, dump):
        self.port = cs._free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = work / "controller.log"
        argv = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "controller-rss-daemon.py"), "--config-dir", str(config_dir),
                "--state-dir", str(work / "state"), "--listen", f"127.0.0.1:{self.port}"]
        env = dict(os.environ, RSS_DUMP=str(dump), RSS_TRACE=str(args.trace), PYTHONPATH=os.getcwd())
        with open(self.log, "wb") as f:
            self.proc = subprocess.Popen(argv, cwd=os.getcwd(), stdout=f, stderr=subprocess.STDOUT, env=env)

async def dump(dumpbase, n):
    Path(f"{dumpbase}.trigger{n}").write_text("x")
    while not Path(f"{dumpbase}.{n}.done").exists():
        await asyncio.sleep(0.2)

async def main():
    from controller.agent.controller_link import HealthReport
    from controller.agent.plan_client import PlanClient
    from controller.config.desired import load_desired
    res = {"load0": load_average()}
    tmp = Path(tempfile.mkdtemp(prefix="rss-drive-"))
    cdir = tmp / "desired"
    cs.generate(cdir, args.vips, args.pops, args.files)
    cs._git(cdir, "init", "-q"); cs._git(cdir, "add", "-A"); cs._git(cdir, "commit", "-qm", "x")
    desired = load_desired(str(cdir))
    names = [v.name for v in desired.vips]
    regions = {v.name: tuple(o.region for o in v.vip.origins) for v in desired.vips}
    dumpbase = Path(args.out + ".heap")
    d = TDaemon(cdir, tmp, dumpbase)
    t0 = time.monotonic()
    clients = {}
    try:
        while not d.answering():
            assert d.alive(), d.log.read_text()[-2000:]
            await asyncio.sleep(0.1)
        clients = {p.name: PlanClient(d.url, p.name, cs.token(p.name), str(tmp / f"agent-{p.name}"),
                                      desired.allowed_prefixes, timeout=600.0) for p in desired.pops}
        plan = await clients[cs.WATCHED_POP].fetch_plan(-1, 0)
        res["up_s"] = round(time.monotonic() - t0, 1)
        res["rss_start"] = cs._status_mb(d.proc.pid, "VmRSS")
        reps = {pop: HealthReport(pop, plan.generation if pop == cs.WATCHED_POP else 0,
                                  cs.verdicts(names, regions, i, len(clients), down_every=0),
                                  {n: True for n in names}) for i, pop in enumerate(clients)}
        async def one(pop):
            for attempt in (1, 2, 3):
                try:
                    await clients[pop].report(reps[pop]); return
                except Exception as e:
                    print("report retry", pop, str(e)[:100], flush=True)
        await asyncio.gather(*(one(p) for p in clients))
        await cs._status(d)
        res["rss_after_reports"] = cs._status_mb(d.proc.pid, "VmRSS")
        await asyncio.sleep(3)
        res["idle_wait"] = await cs._until_idle(d.proc.pid)
        # idle window: nothing sent
        c0, w0 = cs._cpu_s(d.proc.pid), time.monotonic()
        await asyncio.sleep(10)
        res["idle_cpu"] = round((cs._cpu_s(d.proc.pid) - c0) / (time.monotonic() - w0), 4)
        res["rss_idle"] = cs._status_mb(d.proc.pid, "VmRSS")
        if args.trace:
            await dump(dumpbase, 0)
        # steady: reports only (no probe)
        cs.STEADY_S = args.steady
        orig_probe = cs._Probe
        class NoProbe:
            def __init__(self, *a): pass
            def stop(self): return {}
        cs._Probe = NoProbe
        s1 = await cs._steady_state(d, clients, names, regions, len(clients), print)
        cs._Probe = orig_probe
        res["steady_reports_only"] = {k: s1[k] for k in ("steady_cpu_fraction", "steady_rss_mb", "steady_report_failures", "steady_load_average", "steady_report_kind")}
        # probe only
        probe = cs._Probe(d.port, tmp / "probe.json")
        c0, w0 = cs._cpu_s(d.proc.pid), time.monotonic()
        await asyncio.sleep(args.steady)
        res["probe_only_cpu"] = round((cs._cpu_s(d.proc.pid) - c0) / (time.monotonic() - w0), 4)
        probe.stop()
        # the bench's steady state: both
        s2 = await cs._steady_state(d, clients, names, regions, len(clients), print)
        res["steady_bench"] = {k: s2[k] for k in ("steady_cpu_fraction", "steady_rss_mb", "steady_stall_ms", "steady_load_average")}
        if args.pyspy:  # a fourth window, reports only, sampled (py-spy --nonblocking: the daemon is not paused)
            pys = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "py-spy"), "record", "--nonblocking", "-r", "100",
                                    "-d", str(int(args.steady)), "-f", "raw", "-o", args.pyspy, "-p", str(d.proc.pid)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            cs._Probe = NoProbe
            s3 = await cs._steady_state(d, clients, names, regions, len(clients), print)
            cs._Probe = orig_probe
            pys.wait()
            res["steady_reports_only_sampled_cpu"] = s3["steady_cpu_fraction"]
        res["rss_end"] = cs._status_mb(d.proc.pid, "VmRSS")
        res["peak"] = cs._status_mb(d.proc.pid, "VmHWM")
        if args.trace:
            await dump(dumpbase, 1)
    finally:
        for c in clients.values():
            await c.close()
        d.stop()
    res["load1"] = load_average()
    print(json.dumps(res, indent=1))
    Path(args.out).write_text(json.dumps(res, indent=1))
asyncio.run(main())
