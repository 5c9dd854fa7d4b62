"""`stat` latency on a bucketfs mount, idle and while a large write is uploaded.

Called by bench/stat-during-upload.sh with the mount point and the size (MiB). The mount has a
metadata TTL of 0, so the kernel asks the daemon at every `stat`, and a long write-back delay,
so `local.txt` (written here) stays un-uploaded and its `stat` is answered from the daemon's
memory: that row measures the FUSE dispatch. `remote.txt` exists only in S3, so each of its
`stat`s is a HEAD: that row measures S3 under the upload's load. Prints a markdown table.
"""

import os
import statistics
import sys
import threading
import time

mnt, size = sys.argv[1], int(sys.argv[2])
local = os.path.join(mnt, "local.txt")
with open(local, "w") as f:
    f.write("not uploaded yet")
remote = os.path.join(mnt, "remote.txt")


def stats(path, stop, out):
    while not stop.is_set():
        t = time.perf_counter()
        os.stat(path)
        out.append(time.perf_counter() - t)
        time.sleep(0.005)


def measure(work):
    """Run `work` while two threads `stat` the two files; their latencies by file."""
    results, stop, threads = {}, threading.Event(), []
    for name, path in (("local", local), ("remote", remote)):
        results[name] = []
        threads.append(threading.Thread(target=stats, args=(path, stop, results[name])))
    for t in threads:
        t.start()
    work()
    stop.set()
    for t in threads:
        t.join()
    return results


def row(name, xs):
    xs = sorted(xs)
    p99 = xs[min(len(xs) - 1, int(len(xs) * 0.99))]
    print(f"| {name} | {len(xs)} | {statistics.median(xs) * 1e3:.2f} | "
          f"{p99 * 1e3:.2f} | {xs[-1] * 1e3:.2f} |")


took = {}


def upload():
    start = time.perf_counter()
    block = os.urandom(1 << 20)
    with open(os.path.join(mnt, "big.bin"), "wb") as f:
        for _ in range(size):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    took["s"] = time.perf_counter() - start


idle = measure(lambda: time.sleep(2))
busy = measure(upload)
print(f"{size} MiB written and fsync'd (in S3) in {took['s']:.1f} s. `stat` latency:\n")
print("| `stat` of | count | median ms | p99 ms | max ms |")
print("| --- | --- | --- | --- | --- |")
row("a file with local changes (daemon memory), idle", idle["local"])
row(f"a file with local changes (daemon memory), during the {size} MiB upload", busy["local"])
row("a file only in S3 (a HEAD each), idle", idle["remote"])
row(f"a file only in S3 (a HEAD each), during the {size} MiB upload", busy["remote"])
