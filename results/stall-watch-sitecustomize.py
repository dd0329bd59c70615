"""Diagnostic sitecustomize for the controller daemon (section 3q): PYTHONPATH=DIR STALLWATCH=FILE. Logs
callbacks over 30 ms (SLOWCB, with the main thread CPU), epoll waits that returned 30 ms late (SLOWSELECT: the
GIL re-taken late) and gaps over 40 ms in a 5 ms watchdog thread (WATCHGAP, with each thread's CPU ticks over the
gap). SWITCHINT=S: sys.setswitchinterval(S) in the daemon.
INLINE_PARSE=1: the daemon parses every report on the loop (app.THREADED_REPORT_BYTES set past any body).
"""
import os, sys, time, threading
_OUT = os.environ.get("STALLWATCH")
if _OUT and "controller.cli.controller_main" in " ".join(getattr(sys, "orig_argv", sys.argv)) or (_OUT and os.environ.get("STALLWATCH_ALL")):
    _f = open(_OUT, "a", buffering=1)
    _lock = threading.Lock()
    def _w(msg):
        with _lock:
            _f.write(f"{time.monotonic():.3f} {msg}\n")
    def _cpu():
        out = {}
        try:
            for tid in os.listdir("/proc/self/task"):
                try:
                    with open(f"/proc/self/task/{tid}/stat") as fh:
                        s = fh.read()
                    name = s[s.index("(")+1:s.rindex(")")]
                    parts = s[s.rindex(")")+2:].split()
                    out[f"{tid}:{name}"] = int(parts[11]) + int(parts[12])
                except OSError:
                    pass
        except OSError:
            pass
        return out
    def _watch():
        last = time.monotonic(); c0 = _cpu()
        while True:
            time.sleep(0.005)
            t = time.monotonic(); c1 = _cpu()
            if t - last > 0.04:
                d = {k: v - c0.get(k, 0) for k, v in c1.items() if v - c0.get(k, 0)}
                _w(f"WATCHGAP {1000*(t-last):.0f}ms cpu_ticks={d}")
            last, c0 = t, c1
    threading.Thread(target=_watch, name="stallwatch", daemon=True).start()
    import asyncio.events as _ev
    _orig = _ev.Handle._run
    def _run(self):
        t = time.perf_counter(); c = time.thread_time()
        _orig(self)
        dt = time.perf_counter() - t
        if dt > 0.03:
            _w(f"SLOWCB {1000*dt:.0f}ms cpu {1000*(time.thread_time()-c):.0f}ms {self!r:.300}")
    _ev.Handle._run = _run
    import selectors as _sel
    _os = _sel.EpollSelector.select
    def _select(self, timeout=None):
        t = time.perf_counter()
        r = _os(self, timeout)
        dt = time.perf_counter() - t
        if r and dt > 0.03 and (timeout is None or timeout < 0 or dt > timeout + 0.03):
            _w(f"SLOWSELECT {1000*dt:.0f}ms timeout={timeout} events={len(r)}")
        return r
    _sel.EpollSelector.select = _select
    _t0 = [time.perf_counter()]
if os.environ.get("SWITCHINT") and "controller.cli.controller_main" in " ".join(getattr(sys, "orig_argv", sys.argv)):
    sys.setswitchinterval(float(os.environ["SWITCHINT"]))
if os.environ.get("INLINE_PARSE") and "controller.cli.controller_main" in " ".join(getattr(sys, "orig_argv", sys.argv)):
    def _inline():
        while "controller.server.app" not in sys.modules or not hasattr(sys.modules["controller.server.app"], "THREADED_REPORT_BYTES"):
            time.sleep(0.01)
        sys.modules["controller.server.app"].THREADED_REPORT_BYTES = 1 << 40
    threading.Thread(target=_inline, daemon=True).start()
