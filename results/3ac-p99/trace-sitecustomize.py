# bench-only: log every event-loop callback over 15 ms in the controller daemon (3z's tracer, short form)
import os, sys, time
if os.environ.get("STALL_TRACE") and "controller.cli.controller_main" in sys.orig_argv:
    import asyncio.events, gc, traceback
    _out = open(os.environ["STALL_TRACE"] + f".{os.getpid()}", "a", buffering=1)
    _real = asyncio.events.Handle._run
    def _run(self):
        t = time.perf_counter()
        try:
            return _real(self)
        finally:
            d = (time.perf_counter() - t) * 1000
            if d > 15:
                cb = getattr(self, "_callback", None)
                task = getattr(cb, "__self__", None)
                where = ""
                coro = getattr(task, "get_coro", lambda: None)()
                if coro is not None:
                    fr = getattr(coro, "cr_frame", None)
                    where = repr(coro)
                _out.write(f"{time.time():.3f} {d:.1f}ms {where[:200] or repr(self)[:200]}\n")
    asyncio.events.Handle._run = _run
    _gc = {}
    def _gccb(phase, info):
        if phase == "start":
            _gc["t"] = time.perf_counter()
        else:
            d = (time.perf_counter() - _gc.get("t", time.perf_counter())) * 1000
            if d > 5:
                _out.write(f"{time.time():.3f} GC gen{info['generation']} {d:.1f}ms collected {info['collected']}\n")
    gc.callbacks.append(_gccb)
