import json, os, sys, time, subprocess
sys.path.insert(0, sys.argv[1])
from controller.server import revision as rv
d = sys.argv[2]
use_copy = sys.argv[3] == "copy"
# make vips.yaml racily clean: its mtime and the index's in one second
t = (int(os.stat(os.path.join(d, "vips.yaml")).st_mtime) - 3600) * 10**9
os.utime(os.path.join(d, "vips.yaml"), ns=(t, t))
env = {**os.environ, "GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@b", "GIT_COMMITTER_NAME": "b", "GIT_COMMITTER_EMAIL": "b@b"}
subprocess.run(["git", "-C", d, "add", "vips.yaml"], check=True, env=env)
os.utime(os.path.join(d, ".git", "index"), ns=(t + 5 * 10**8, t + 5 * 10**8))
fp = rv.fingerprint(d)
idx = rv.IndexCopy(os.path.join(d, ".git")) if use_copy else None
times = []
for i in range(20):
    s = time.perf_counter()
    r = rv.revision(d, fp, idx) if idx else rv.revision(d, fp)
    times.append(round((time.perf_counter() - s) * 1000, 1))
    assert "+dirty" not in r, r
print(json.dumps({"code": sys.argv[1], "copy": use_copy, "ms": times, "median_ms": sorted(times)[10],
                  "load": os.getloadavg()}))
