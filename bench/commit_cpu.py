"""The CPU of one commit in process (results 3g, 3l): the daemon's own ``Watcher.changed``,
``Watcher.load`` and ``Controller.apply_config`` with its pass, no HTTP, no agent.

    python -m bench.commit_cpu --files 1 [--add] [--reps 6] [--profile]

A generated checkout (controller_scale.generate, 10,000 VIPs x 50 POPs) in git, every POP's
full report, then ``--reps`` commits: one VIP's publish list loses or regains p00, or
(``--add``) a new VIP published at every POP. CPU seconds of this process per step (the git
children not counted); ``--profile``: cProfile's top functions over the commits.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import tempfile
import time
from pathlib import Path

from .controller_scale import CHANGED_VIP, EVERYWHERE_VIP, _git, _new_vip_block, _vip_block, generate, verdicts


def toggled(text: str, vip: str = CHANGED_VIP, pop: str = "p00") -> str:
    """``text`` (a generated VIP file: "- name:", "address:", then "publish: [...]") with
    ``pop`` taken out of ``vip``'s publish list, or put back first if it is not there."""
    head, sep, tail = text.partition(f"  - name: {vip}\n")
    address_line, _, rest = tail.partition("\n")
    publish_line, _, rest = rest.partition("\n")
    pops = publish_line.split("[", 1)[1].rstrip("]").split(", ")
    pops = [p for p in pops if p != pop] if pop in pops else [pop, *pops]
    return f"{head}{sep}{address_line}\n    publish: [{', '.join(pops)}]\n{rest}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.commit_cpu")
    p.add_argument("--files", type=int, default=1)
    p.add_argument("--vips", type=int, default=10000)
    p.add_argument("--pops", type=int, default=50)
    p.add_argument("--reps", type=int, default=6)
    p.add_argument("--add", action="store_true")
    p.add_argument("--profile", action="store_true")
    a = p.parse_args(argv)
    from controller.policy.model import PopReport
    from controller.server.core import Controller
    from controller.server.daemon import Watcher

    with tempfile.TemporaryDirectory(prefix="bench-commit-cpu-") as tmp:
        d = Path(tmp) / "desired"
        generate(d, a.vips, a.pops, a.files)
        _git(d, "init", "-q")
        _git(d, "add", "-A")
        _git(d, "commit", "-qm", "synthetic desired state")
        w = Watcher(str(d), str(Path(tmp) / "state"), use_inotify=False)
        desired = w.load()
        now = [time.time()]
        ctl = Controller(desired, clock=lambda: now[0])
        names = [v.name for v in desired.vips]
        regions = {v.name: tuple(o.region for o in v.vip.origins) for v in desired.vips}
        for i, pop in enumerate(desired.pops):
            ctl.add_report(PopReport(pop.name, now[0], 1, verdicts(names, regions, i, len(desired.pops), 0),
                                     {n: True for n in names}))
        ctl.replan()
        prof = cProfile.Profile() if a.profile else None
        for rep in range(a.reps):
            now[0] += 5.0
            target = next(f for f in sorted(d.rglob("*.yaml")) if f"  - name: {CHANGED_VIP}\n" in f.read_text())
            text = target.read_text()
            if a.add:
                x, y = _vip_block(text, EVERYWHERE_VIP)
                block, _ = _new_vip_block(text[x:y], rep)
                new_text = text[:y] + block + text[y:]
            else:
                new_text = toggled(text)
            target.write_text(new_text)
            _git(d, "commit", "-qam", f"rep {rep}")
            w._dirty = True  # (what inotify's batch does)
            if prof:
                prof.enable()
            c0 = time.process_time()
            assert w.changed()
            c1 = time.process_time()
            new = w.load()
            c2 = time.process_time()
            ctl.apply_config(new)  # no event loop: planned and served at once
            c3 = time.process_time()
            if prof:
                prof.disable()
            print(f"cpu rep {rep}: changed {c1 - c0:.3f} load {c2 - c1:.3f} apply+plan {c3 - c2:.3f} "
                  f"total {c3 - c0:.3f}  ({ctl.rollout.phase.value})", flush=True)
        w.close()
        ctl.close()
        if prof:
            pstats.Stats(prof).sort_stats("cumulative").print_stats(45)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
