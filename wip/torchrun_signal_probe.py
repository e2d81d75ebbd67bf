import os, signal, sys, time
rank = os.environ.get("RANK")
got = []
def handler(signum, frame):
    got.append(signum)
    print(f"rank {rank} pid {os.getpid()} got signal {signal.Signals(signum).name} at {time.time():.2f}", flush=True)
for s in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(s, handler)
start = time.time()
while time.time() - start < 60:
    time.sleep(0.1)
    if got:
        print(f"rank {rank} finishing step and saving for 3 s", flush=True)
        time.sleep(3)
        print(f"rank {rank} saved, exiting 75 at {time.time():.2f}", flush=True)
        sys.exit(75)
print(f"rank {rank} timed out", flush=True)
