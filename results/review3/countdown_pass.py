"""CPU per background pass while 10,000 VIPs count down (every VIP's us-west down at every POP:
each waits its failover window, settle 30 s here, "waiting N s more"), one VIP's report changing
every 0.1 s of the controller's clock (a pass each, as an incident's reports do). Main's code
re-plans the 10,000 counting down at every pass; the branch those planned 1 s ago or more.
Run from the tree measured: python results/review3/countdown_pass.py [VIPS] [POPS] [PASSES]"""
import asyncio
import dataclasses
import statistics
import sys
import tempfile
import time

sys.path.insert(0, ".")  # (the tree measured)
from controller.policy.model import PopReport  # noqa: E402
from controller.server.core import Controller  # noqa: E402
from tests.helpers.sliced_fleet import ALL_AT_ONCE, BASE  # noqa: E402
from controller.config.desired_model import FleetVip, PopSpec  # noqa: E402

VIPS = int(sys.argv[1]) if len(sys.argv) > 1 else 10_000
NPOPS = int(sys.argv[2]) if len(sys.argv) > 2 else 10
PASSES = int(sys.argv[3]) if len(sys.argv) > 3 else 40
POPS = tuple(f"p{i:02d}" for i in range(NPOPS))
names = [f"v{i:05d}" for i in range(VIPS)]


def main() -> None:
    template = BASE.vip("game-global")
    assert template is not None
    policy = dataclasses.replace(template.policy, safety=dataclasses.replace(template.policy.safety, settle=30.0))
    vips = tuple(FleetVip(dataclasses.replace(template.vip, name=n), POPS, True, policy) for n in names)
    state = tempfile.mkdtemp(prefix="r3-countdown-")
    desired = dataclasses.replace(BASE, state_dir=state, pops=tuple(PopSpec(p, "0" * 64) for p in POPS),
                                  vips=vips, change=ALL_AT_ONCE)
    now = [100.0]
    ctl = Controller(desired, clock=lambda: now[0])
    up = {"us-west": True, "eu-central": True}
    down = {"us-west": False, "eu-central": True}
    ctl.reports.update({p: PopReport(p, now[0], 1, dict.fromkeys(names, up)) for p in POPS})
    ctl.replan()

    async def drive() -> None:
        await ctl.settled()
        while (driver := ctl.planning()) is not None and not driver.done():
            await asyncio.sleep(0)
        while ctl._writing is not None:  # (its journal write too: CPU of the pass)
            await asyncio.sleep(0.001)

    async def scenario() -> list[float]:
        for p in POPS:
            ctl.accept_report(PopReport(p, now[0], 1, dict.fromkeys(names, down)))
        await drive()
        counting = sum(1 for n in ctl.result.notes.values() if "more" in n)
        print(f"{counting} of {VIPS} VIPs counting down at {NPOPS} POPs")
        cpu = []
        for k in range(PASSES):
            now[0] += 0.1
            origins = dict.fromkeys(names, down)
            origins[names[k % VIPS]] = up  # (one VIP's verdict changes: a pass)
            t = time.process_time()
            ctl.accept_report(PopReport(POPS[k % NPOPS], now[0], 1, origins))
            await drive()
            cpu.append(time.process_time() - t)
        return cpu

    cpu = asyncio.run(scenario())
    print("per pass, ms:", " ".join(f"{c * 1000:.0f}" for c in cpu))
    print(f"{PASSES} passes, 0.1 s apart on the clock: CPU per pass mean {statistics.mean(cpu) * 1000:.1f} ms, "
          f"median {statistics.median(cpu) * 1000:.1f} ms, max {max(cpu) * 1000:.1f} ms, "
          f"total {sum(cpu):.2f} s")


main()
