"""Run the controller daemon in this process; on SIGUSR1 (thread) dump tracemalloc stats."""
import os, sys, threading, time, tracemalloc, gc, json
out = os.environ["RSS_DUMP"]
TRACE = os.environ.get("RSS_TRACE", "1") == "1"
if TRACE:
    tracemalloc.start(int(os.environ.get("RSS_FRAMES", "8")))

def watch():
    n = 0
    while True:
        trig = out + f".trigger{n}"
        while not os.path.exists(trig):
            time.sleep(0.2)
        rss = open("/proc/self/status").read()
        if TRACE:
            snap = tracemalloc.take_snapshot()
            snap = snap.filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
            with open(out + f".{n}.txt", "w") as f:
                cur, peak = tracemalloc.get_traced_memory()
                f.write(f"traced {cur/2**20:.1f} MB peak {peak/2**20:.1f}\n")
                f.write([l for l in rss.splitlines() if l.startswith("VmRSS")][0] + "\n")
                f.write("== by lineno\n")
                for s in snap.statistics("lineno")[:60]:
                    f.write(f"{s.size/2**20:8.2f} MB {s.count:9d} {s.traceback[0]}\n")
                f.write("== by traceback\n")
                for s in snap.statistics("traceback")[:40]:
                    f.write(f"{s.size/2**20:8.2f} MB {s.count:9d}\n")
                    for fr in s.traceback.format()[-16:]:
                        f.write("      " + fr + "\n")
            snap = None
        open(out + f".{n}.done", "w").write("ok")
        n += 1

threading.Thread(target=watch, daemon=True).start()
from controller.cli.controller_main import main
sys.exit(main(sys.argv[1:]))
