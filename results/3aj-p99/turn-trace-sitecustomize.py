# bench-only tracer (p99b): every loop turn (from epoll's return to the next epoll) over 12 ms,
# with its callbacks over 1 ms and the GC inside each; stack samples of callbacks running > 5 ms
import os, sys, time
if os.environ.get("STALL_TRACE") and "controller.cli.controller_main" in sys.orig_argv:
    import asyncio.events, gc, threading, collections, selectors
    _out = open(os.environ["STALL_TRACE"] + f".{os.getpid()}", "a", buffering=1)
    _real = asyncio.events.Handle._run
    _st = {"t": None, "gc": 0.0, "samples": [], "turn": None, "cbs": [], "turngc": 0.0}
    _main = threading.get_ident()
    _sample = bool(os.environ.get("STALL_SAMPLE"))
    def _where(fr):
        out = []
        while fr is not None and len(out) < 5:
            c = fr.f_code
            if "/controller/" in c.co_filename:
                out.append(f"{os.path.basename(c.co_filename)}:{c.co_name}:{fr.f_lineno}")
            fr = fr.f_back
        return " < ".join(out)
    def _dog():
        while True:
            time.sleep(0.003)
            t = _st["t"]
            if t is not None and time.perf_counter() - t > 0.005:
                fr = sys._current_frames().get(_main)
                if fr is not None and _st["t"] is t:
                    _st["samples"].append(_where(fr))
    if _sample:
        threading.Thread(target=_dog, daemon=True, name="tracedog").start()
    _sel = selectors.EpollSelector.select
    def _select(self, timeout=None):
        if threading.get_ident() == _main and _st["turn"] is not None:
            d = (time.perf_counter() - _st["turn"]) * 1000
            if d > 12:
                _out.write(f"{time.time():.3f} TURN {d:.1f}ms gc {_st['turngc']:.1f} n{_st['ncb']}: " + " | ".join(_st["cbs"]) + "\n")
        r = _sel(self, timeout)
        if threading.get_ident() == _main:
            _st["turn"] = time.perf_counter()
            _st["cbs"] = []
            _st["turngc"] = 0.0
            _st["ncb"] = 0
        return r
    selectors.EpollSelector.select = _select
    def _name(self):
        cb = getattr(self, "_callback", None)
        task = getattr(cb, "__self__", None)
        coro = getattr(task, "get_coro", lambda: None)()
        if coro is not None:
            return getattr(coro, "__qualname__", repr(coro))
        return getattr(cb, "__qualname__", repr(cb))[:60]
    def _run(self):
        if threading.get_ident() != _main:
            return _real(self)
        t = _st["t"] = time.perf_counter()
        _st["gc"] = 0.0
        _st["samples"] = []
        try:
            return _real(self)
        finally:
            _st["t"] = None
            d = (time.perf_counter() - t) * 1000
            _st["ncb"] = _st.get("ncb", 0) + 1
            if d > 1:
                g = f" gc{_st['gc']:.0f}" if _st["gc"] > 0.5 else ""
                s = ""
                if _st["samples"]:
                    s = " [" + "; ".join(f"{n}x {w}" for w, n in collections.Counter(_st["samples"]).most_common(2)) + "]"
                _st["cbs"].append(f"{_name(self)} {d:.1f}{g}{s}")
    asyncio.events.Handle._run = _run
    _gc = {}
    def _gccb(phase, info):
        if phase == "start":
            _gc["t"] = time.perf_counter()
        else:
            d = (time.perf_counter() - _gc.get("t", time.perf_counter())) * 1000
            if threading.get_ident() == _main:
                _st["gc"] += d
                _st["turngc"] += d
            if d > 5:
                _out.write(f"{time.time():.3f} GC gen{info['generation']} {d:.1f}ms collected {info['collected']}\n")
    gc.callbacks.append(_gccb)
