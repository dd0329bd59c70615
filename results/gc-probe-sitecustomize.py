# results 3r. Run: GCPROBE_DIR=DIR PYTHONPATH=DIR_OF_THIS_FILE_AS_sitecustomize.py python -m bench.commit_latency ...
# GC probe for bench.commit_latency: the controller daemon and the bench watcher log every
# cyclic collection (wall start, duration, generation, collected) to $GCPROBE_DIR/<role>-<pid>.log
import gc, os, sys, time
_argv = " ".join(getattr(sys, "orig_argv", sys.argv))
_role = "daemon" if "controller.cli.controller_main" in _argv else ("watcher" if "bench.commit_latency" in _argv else None)
if _role and os.environ.get("GCPROBE_DIR"):
    _f = open(os.path.join(os.environ["GCPROBE_DIR"], f"{_role}-{os.getpid()}.log"), "a", buffering=1)
    _s = [0.0, 0.0]
    def _cb(phase, info):
        if phase == "start":
            _s[0] = time.time(); _s[1] = time.perf_counter()
        else:
            _f.write(f"{_s[0]:.4f} {time.perf_counter() - _s[1]:.5f} {info['generation']} {info.get('collected', 0)}\n")
    gc.callbacks.append(_cb)
