"""Section 3ae: two things asyncinotify 4.4.4 (PyPI's latest, 2026-04) does that our watcher must not.

Run with asyncinotify importable (``pip download --no-deps asyncinotify`` and unzip the wheel
onto PYTHONPATH; it is not a dependency of ours):

    PYTHONPATH=/tmp/asyncinotify-wheel:. .venv/bin/python results/inotify2/asyncinotify-probe.py

1. Its default descriptor blocks (``InitFlags.NONBLOCK`` is ``getattr(os, 'O_CLOEXEC', 0)``),
   so draining the queue to empty, as ``controller.server.inotify.Inotify.read`` does when the
   loop says readable, blocks until the next change (here: SIGALRM after 2 s).
2. A directory moved inside the watched tree and watched again at its new path returns the
   same wd, and asyncinotify keeps the first ``Watch.path``: a file written at the new place
   is reported at the old one. Ours (``controller.server.inotify.Inotify``), same moves:
   the file at its new path, and the drain returns.
"""

from __future__ import annotations

import os
import signal
import tempfile
from pathlib import Path
from typing import Any

from controller.server.inotify import Inotify

import asyncinotify as ai  # type: ignore[import-not-found, unused-ignore]


def _timeout(*_: Any) -> None:
    raise TimeoutError("blocked in os.read")


def main() -> None:
    print("asyncinotify", ai.__version__, "InitFlags:", list(ai.InitFlags), "O_NONBLOCK =", os.O_NONBLOCK)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "a" / "sub").mkdir(parents=True)
        (t / "b").mkdir()
        ino = ai.Inotify()
        print("default descriptor blocking:", os.get_blocking(ino.fd))
        mask = ai.Mask.CREATE | ai.Mask.MOVED_TO | ai.Mask.MOVED_FROM | ai.Mask.MODIFY | ai.Mask.CLOSE_WRITE
        first = ino.add_watch(t / "a" / "sub", mask)
        ino.add_watch(t / "a", mask)
        ino.add_watch(t / "b", mask)
        os.rename(t / "a" / "sub", t / "b" / "sub")
        again = ino.add_watch(t / "b" / "sub", mask)
        print("re-added at the new path: same wd", first.wd == again.wd, "- Watch.path", again.path.relative_to(t))
        (t / "b" / "sub" / "x.yaml").write_text("a: 1\n")
        signal.signal(signal.SIGALRM, _timeout)
        signal.alarm(2)
        try:
            while True:
                ev = ino.sync_get()
                assert ev is not None
                print("event", repr(ev.mask), ev.path.relative_to(t) if ev.path else None)
        except TimeoutError as exc:
            print("draining to empty:", exc, "(2 s, until SIGALRM)")
        except BlockingIOError:
            print("draining to empty: BlockingIOError (non-blocking)")
        finally:
            signal.alarm(0)
            ino.close()
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        (t / "a" / "sub").mkdir(parents=True)
        (t / "b").mkdir()
        ours = Inotify()
        ours.add(str(t))
        os.rename(t / "a" / "sub", t / "b" / "sub")
        print("ours:", [(c.name, os.path.relpath(p, t)) for c, p in ours.read()])
        (t / "b" / "sub" / "x.yaml").write_text("a: 1\n")
        print("ours:", [(c.name, os.path.relpath(p, t)) for c, p in ours.read()], "(drained: returned)")
        ours.close()


if __name__ == "__main__":
    main()
