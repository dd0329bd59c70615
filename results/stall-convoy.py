"""The GIL convoy in small: an asyncio loop reading 50 always-readable sockets, with and without a thread
parsing 10,000-VIP reports (json.loads + wire.decode_report), at switch intervals 5 and 0.5 ms; prints the
loop's lateness on a 10 ms sleep. Section 3q. Run: .venv/bin/python results/stall-convoy.py"""
import asyncio, sys, threading, time, json, socket, os, multiprocessing
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from controller import wire
names=[f"vip-{i:05d}" for i in range(10000)]
regs=("eu-west","us-east","ap-south")
published={n:regs for n in names}
w=wire.WireReport(0, {n:{r:True for r in regs} for n in names}, {n:True for n in names}, 1)
raw=json.dumps(wire.encode_report(w)).encode()
def writer(fds):
    socks=[socket.socket(fileno=f) for f in fds]
    buf=b"x"*65536
    while True:
        for s in socks:
            try: s.send(buf)
            except BlockingIOError: pass
            except OSError: return
def parse(stop):
    while not stop.is_set():
        wire.decode_report(json.loads(raw), published)
async def main(sw, threaded):
    sys.setswitchinterval(sw)
    pairs=[socket.socketpair() for _ in range(50)]
    for a,b in pairs: a.setblocking(False); b.setblocking(False)
    p=multiprocessing.Process(target=writer, args=([b.fileno() for a,b in pairs],)); p.start()
    loop=asyncio.get_running_loop()
    for a,b in pairs:
        loop.add_reader(a.fileno(), lambda s=a: s.recv(65536))
    stop=threading.Event()
    if threaded: threading.Thread(target=parse, args=(stop,), daemon=True).start()
    lat=[]
    end=time.monotonic()+4
    while time.monotonic()<end:
        t=time.perf_counter(); await asyncio.sleep(0.01); lat.append((time.perf_counter()-t-0.01)*1000)
    stop.set(); p.kill()
    lat.sort(); print(f"switch {sw*1000}ms thread={threaded}: n={len(lat)} p50 {lat[len(lat)//2]:.1f} p99 {lat[int(len(lat)*.99)]:.1f} max {lat[-1]:.1f} ms")
for sw in (0.005, 0.0005):
    for th in (False, True):
        asyncio.run(main(sw, th))
