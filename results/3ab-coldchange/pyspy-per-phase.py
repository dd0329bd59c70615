import cProfile, os, signal, subprocess, sys, time
from pathlib import Path
import bench.controller_scale as cs

outdir = Path(sys.argv[4])
orig = cs._Phases.arun
async def arun(self, name, fn):
    if not name.startswith("change"):
        return await orig(self, name, fn)
    tag = name.split(":")[1].strip().replace(" ", "_").replace("'", "")
    spy = subprocess.Popen([sys.executable.replace("python", "py-spy"), "record", "-r", "200", "-p", str(os.getpid()),
                            "-f", "raw", "-o", str(outdir / (tag + ".txt")), "--threads"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)
    try:
        return await orig(self, name, fn)
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait()
cs._Phases.arun = arun
vips, pops, files = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
print(cs.render_cold(cs.cold_main(vips, pops, files, None, lambda m: print(m, flush=True))))
