# bench-only experiment: the daemon's GC thresholds from P99_GC (e.g. 20000,250,100)
import gc, os, sys
if os.environ.get("P99_GC") and "controller.cli.controller_main" in sys.orig_argv:
    _want = tuple(int(x) for x in os.environ["P99_GC"].split(","))
    _real = gc.set_threshold
    def set_threshold(*args):
        _real(*_want)
    gc.set_threshold = set_threshold
