"""bench.controller_scale cold with py-spy attached during each change only."""
import os, signal, subprocess, sys
import bench.controller_scale as cs
OUT = os.environ.get("PROF_OUT", "/tmp/change1s/prof")
state = {"proc": None, "n": 0}
def start():
    state["n"] += 1
    state["proc"] = subprocess.Popen(["/tmp/change1s-pyspy/bin/py-spy", "record", "--pid", str(os.getpid()), "--rate", "200",
                                      "--format", "raw", "--nonblocking", "--threads", "-o", f"{OUT}-change{state['n']}.txt"],
                                     env={**os.environ, "PYTHONPATH": "/tmp/change1s-pyspy"}, stdout=subprocess.DEVNULL)
    import time; time.sleep(1.5)
def stop():
    p = state["proc"]
    if p is not None:
        p.send_signal(signal.SIGINT); p.wait(); state["proc"] = None
for fname in ("_edit_publish", "_edit_port"):
    orig = getattr(cs, fname)
    def wrapped(d, pops, orig=orig):
        start(); orig(d, pops)
    setattr(cs, fname, wrapped)
orig_done = cs._Phases.done
def done(self, name, *a):
    orig_done(self, name, *a)
    if name.startswith("change"):
        stop()
cs._Phases.done = done
from pathlib import Path
vips, pops, files, out = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
print(cs.render_cold(cs.cold_main(vips, pops, files, out, lambda m: print(m, flush=True))))
