#!/usr/bin/env python3
"""bucketfs benchmark driver: bucketfs against s3fs, rclone mount and the raw SDK (boto3).

Run it through bench/run.sh, which installs the tools, starts SeaweedFS and passes the
endpoint in BUCKETFS_TEST_SEAWEEDFS_{ENDPOINT,ACCESS_KEY,SECRET_KEY}. See docs/BENCHMARKS.md.

Every file-system operation runs in a child process (`bench.py op ...`) with a timeout, so a
hung mount costs one timeout, not the run: on a timeout the mount's FUSE connection is aborted,
its daemon killed and the mount lazily unmounted. Standard library only, plus boto3 for the
SDK baseline and for watching the bucket.
"""
import argparse
import concurrent.futures as cf
import datetime
import json
import os
import platform
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

MiB = 1 << 20
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SMALL_SIZE = 4096
LS_OBJECT_SIZE = 1024
BIG_KEY = "big.bin"
MANY_PREFIX = "many/"
POLL = 0.05  # seconds between HeadObject / ListObjectsV2 polls


# ------------------------------------------------------------------------------------------
# Child-process operations. Each prints one JSON object on stdout; times are seconds from
# "t0" (time.monotonic(), which is system-wide, so the driver can continue the clock).
# ------------------------------------------------------------------------------------------

def _pattern(nbytes, seed):
    rng = random.Random(seed)
    return rng.randbytes(nbytes)


def op_main(argv):
    kind, args = argv[0], argv[1:]
    out = {}
    if kind == "write":  # PATH SIZE FSYNC(0|1)
        path, size, do_fsync = args[0], int(args[1]), args[2] == "1"
        buf = memoryview(_pattern(16 * MiB, size))
        t0 = time.monotonic()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        done, i = 0, 0
        while done < size:
            n = min(MiB, size - done)
            off = (i % 16) * MiB
            w = os.write(fd, buf[off:off + n])
            done += w
            i += 1
        out["written"] = time.monotonic() - t0
        if do_fsync:
            os.fsync(fd)
            out["fsync"] = time.monotonic() - t0
        os.close(fd)
        out["close"] = time.monotonic() - t0
    elif kind == "read":  # PATH EXPECTED_SIZE
        path, size = args[0], int(args[1])
        buf = bytearray(MiB)
        t0 = time.monotonic()
        total = 0
        with open(path, "rb", buffering=0) as f:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                total += n
        out["elapsed"] = time.monotonic() - t0
        if total != size:
            raise SystemExit(f"read {total} bytes, expected {size}")
    elif kind == "randread":  # PATH SIZE COUNT SEED
        path, size, count, seed = args[0], int(args[1]), int(args[2]), int(args[3])
        rng = random.Random(seed)
        offsets = [rng.randrange(size // 4096) * 4096 for _ in range(count)]
        t0 = time.monotonic()
        fd = os.open(path, os.O_RDONLY)
        for off in offsets:
            if len(os.pread(fd, 4096, off)) != 4096:
                raise SystemExit(f"short pread at {off}")
        os.close(fd)
        out["elapsed"] = time.monotonic() - t0
    elif kind == "smallwrite":  # DIR COUNT
        d, count = args[0], int(args[1])
        blob = _pattern(SMALL_SIZE * count, count)
        t0 = time.monotonic()
        os.mkdir(d)
        for i in range(count):
            fd = os.open(os.path.join(d, f"f{i:05d}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.write(fd, blob[i * SMALL_SIZE:(i + 1) * SMALL_SIZE])
            os.close(fd)
        out["close"] = time.monotonic() - t0
    elif kind == "smallread":  # DIR COUNT
        d, count = args[0], int(args[1])
        t0 = time.monotonic()
        names = sorted(os.listdir(d))
        total = 0
        for name in names:
            with open(os.path.join(d, name), "rb", buffering=0) as f:
                total += len(f.read())
        out["elapsed"] = time.monotonic() - t0
        if len(names) != count or total != count * SMALL_SIZE:
            raise SystemExit(f"read {len(names)} files / {total} bytes, expected {count}")
    elif kind == "ls":  # DIR EXPECTED_ENTRIES
        d, count = args[0], int(args[1])
        t0 = time.monotonic()
        r = subprocess.run(["ls", "-l", d], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out["elapsed"] = time.monotonic() - t0
        lines = [l for l in r.stdout.decode(errors="replace").splitlines() if not l.startswith("total ")]
        if r.returncode != 0 or len(lines) != count:
            raise SystemExit(f"ls -l: status {r.returncode}, {len(lines)} entries, expected {count}: "
                             + r.stderr.decode(errors="replace")[:300])
    elif kind == "ready":  # DIR
        os.listdir(args[0])
    else:
        raise SystemExit(f"unknown op {kind}")
    out["t0"] = locals().get("t0", time.monotonic())
    print(json.dumps(out))


# ------------------------------------------------------------------------------------------
# Driver helpers
# ------------------------------------------------------------------------------------------

class OpFailed(Exception):
    pass


class OpTimeout(OpFailed):
    """A file-system operation hung: the mount is aborted."""


class S3Timeout(OpFailed):
    """The bucket did not show the expected objects in time (the mount stays)."""


def log(msg):
    print(f"[bench {datetime.datetime.now().strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def clean_env(extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and not k.startswith("S3_")}
    env.update(extra or {})
    return env


def run_op(args, timeout, on_timeout=None):
    """Runs `bench.py op ARGS` in a child; returns its JSON. On timeout calls on_timeout()
    (which aborts the mount) before killing the child, so the child can be reaped."""
    p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "op", *map(str, args)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                         env=clean_env(), start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        if on_timeout:
            on_timeout()
        p.kill()
        try:
            p.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            log(f"child {p.pid} stuck after the mount was aborted; leaving it")
        raise OpTimeout(f"{args[0]} timed out after {timeout:.0f}s")
    if p.returncode != 0:
        raise OpFailed(f"{args[0]} failed: {err.decode(errors='replace').strip()[-400:]}")
    return json.loads(out)


def drop_caches():
    # Not preceded by sync(): syncing every filesystem would also wait on the FUSE mounts.
    subprocess.run(["sh", "-c", "echo 3 > /proc/sys/vm/drop_caches"], timeout=120, check=True)


def mountinfo_entry(mnt):
    """(major:minor, fstype) of the mount at mnt, or None. Reads /proc only: never touches the mount."""
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            point = parts[4].encode().decode("unicode_escape")
            if point == mnt:
                sep = parts.index("-")
                return parts[2], parts[sep + 1]
    return None


def proc_stats(pid):
    """(peak RSS MiB, CPU seconds) of a live process, or (None, None)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            hwm = next((int(l.split()[1]) / 1024 for l in f if l.startswith("VmHWM:")), None)
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        return hwm, cpu
    except (OSError, StopIteration, IndexError, ValueError):
        return None, None


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class Mount:
    """One mounted file system (a live tool). start() mounts on a fresh, empty cache."""

    def __init__(self, bench, tool):
        self.b, self.tool = bench, tool
        self.mnt = os.path.join(bench.work, "mnt", tool)
        self.cache = os.path.join(bench.work, "cache", tool)
        self.bucket = bench.buckets[tool]
        self.pid = None
        self.proc = None
        self.logf = None
        self.mounted = False
        self.peak_rss = None
        self.cpu = None

    # -- lifecycle ------------------------------------------------------------------------
    def start(self):
        os.makedirs(self.mnt, exist_ok=True)
        shutil.rmtree(self.cache, ignore_errors=True)
        os.makedirs(self.cache)
        self.b.mount_seq += 1
        logpath = os.path.join(self.b.work, "logs", f"{self.tool}-{self.b.mount_seq:03d}.log")
        self.logpath = logpath
        self.logf = open(logpath, "wb")
        b = self.b
        if self.tool == "bucketfs":
            cmd = [b.bucketfs_bin, "mount", f"s3://{self.bucket}", self.mnt, "--endpoint-url",
                   b.endpoint, "--cache-dir", self.cache, "--daemon", *b.bucketfs_args]
            env = clean_env({"S3_ACCESS_KEY_ID": b.key, "S3_SECRET_ACCESS_KEY": b.secret})
            try:
                r = subprocess.run(cmd, env=env, stdin=subprocess.DEVNULL, stdout=self.logf,
                                   stderr=self.logf, timeout=120)
            except subprocess.TimeoutExpired:
                self.abort()
                raise OpFailed("bucketfs mount --daemon did not return in 120s")
            self.pid = self._find_daemon()
            if r.returncode != 0 or self.pid is None:
                self.abort()
                raise OpFailed(f"bucketfs mount failed (status {r.returncode}); see {logpath}")
        else:
            if self.tool == "s3fs":
                cmd = ["s3fs", self.bucket, self.mnt, "-f", "-o",
                       f"passwd_file={b.s3fs_passwd},url={b.endpoint},use_path_request_style,dbglevel=warn"]
            else:
                mode = "writes" if self.tool == "rclone-writes" else "full"
                cmd = ["rclone", "mount", f"bench:{self.bucket}", self.mnt, "--config", b.rclone_conf,
                       "--cache-dir", self.cache, "--vfs-cache-mode", mode, "--log-level", "NOTICE"]
            self.proc = subprocess.Popen(cmd, env=clean_env(), stdin=subprocess.DEVNULL,
                                         stdout=self.logf, stderr=self.logf, start_new_session=True)
            self.pid = self.proc.pid
            deadline = time.monotonic() + 60
            while mountinfo_entry(self.mnt) is None:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.abort()
                    raise OpFailed(f"{self.tool} did not mount; see {logpath}")
                time.sleep(0.1)
        self.b.note_pid(self.pid)
        self.mounted = True
        run_op(["ready", self.mnt], 60, self.abort)

    def _find_daemon(self):
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if argv and argv[0].endswith(b"bucketfs") and b"mount" in argv and self.mnt.encode() in argv:
                if pid_alive(int(d)):
                    return int(d)
        return None

    def sample(self):
        hwm, cpu = proc_stats(self.pid) if self.pid else (None, None)
        if hwm is not None:
            self.peak_rss, self.cpu = hwm, cpu

    def stop(self):
        """Unmounts cleanly (bucketfs drains its uploads) and waits for the daemon to exit."""
        if not self.mounted:
            return
        self.sample()
        r = subprocess.run(["umount", self.mnt], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60)
        if r.returncode != 0:
            log(f"{self.tool}: umount failed ({r.stdout.decode(errors='replace').strip()}); lazy unmount")
            subprocess.run(["umount", "-l", self.mnt], timeout=60)
        deadline = time.monotonic() + self.b.args.drain_timeout
        while self.pid and pid_alive(self.pid):
            if self.proc:
                self.proc.poll()
            if time.monotonic() > deadline:
                log(f"{self.tool}: daemon {self.pid} still running {self.b.args.drain_timeout}s after umount; killing it")
                self.b.issue(f"{self.tool}: daemon still running {self.b.args.drain_timeout}s after umount (killed)")
                self._kill()
                break
            time.sleep(0.1)
        if self.proc:
            self.proc.wait(timeout=30)
            if self.proc.returncode not in (0, None) and self.tool == "bucketfs":
                self.b.issue(f"bucketfs exited with status {self.proc.returncode}")
        self.mounted = False
        self._close_log()

    def abort(self):
        """For a hung or failed mount: abort the FUSE connection, kill the daemon, lazy unmount."""
        ent = mountinfo_entry(self.mnt)
        if ent:
            minor = ent[0].split(":")[1]
            try:
                with open(f"/sys/fs/fuse/connections/{minor}/abort", "w") as f:
                    f.write("1")
            except OSError:
                pass
        self._kill()
        if mountinfo_entry(self.mnt):
            subprocess.run(["umount", "-l", self.mnt], timeout=60)
        self.mounted = False
        self._close_log()

    def _kill(self):
        if self.pid and pid_alive(self.pid):
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.proc:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass

    def _close_log(self):
        if self.logf:
            self.logf.close()
            self.logf = None


# ------------------------------------------------------------------------------------------
# The benchmark
# ------------------------------------------------------------------------------------------

LIVE_MOUNTS = ["bucketfs", "s3fs", "rclone-writes", "rclone-full"]
ALL_TOOLS = ["sdk", "local"] + LIVE_MOUNTS
COLUMN = {"sdk": "raw SDK (boto3)", "local": "local disk", "bucketfs": "bucketfs", "s3fs": "s3fs",
          "rclone-writes": "rclone writes", "rclone-full": "rclone full",
          "mountpoint": "mountpoint-s3 (quoted)"}
RIVALS = ["s3fs", "rclone-writes", "rclone-full"]

# metric id -> (label template, unit, higher_is_better)
METRICS = [
    ("write_close", "{big} seq write: `close` returns", "MiB/s", True),
    ("write_s3", "{big} seq write: in S3 after `close` (HeadObject full size)", "MiB/s", True),
    ("write_durable", "{big} seq write + `fsync`: durable (fsync returned and object in S3)", "MiB/s", True),
    ("read_cold", "{big} seq read, cold (fresh mount, caches dropped)", "MiB/s", True),
    ("read_warm", "{big} seq re-read, warm (same mount)", "MiB/s", True),
    ("small_close", "{n} × 4 KiB files: create+write+close", "s", False),
    ("small_s3", "{n} × 4 KiB files: all in S3 (ListObjectsV2)", "s", False),
    ("small_read", "{n} × 4 KiB files: read back (fresh mount)", "s", False),
    ("small_ls", "`ls -l` of those {n} files (fresh mount)", "s", False),
    ("many_ls", "`ls -l` of {many} objects written by the SDK", "s", False),
    ("randread", "random 4 KiB reads in a {big} object, cold", "reads/s", True),
    ("rss", "daemon peak RSS (VmHWM)", "MiB", False),
    ("cpu", "daemon CPU time over one run's workloads", "s", False),
]

# mountpoint-s3 1.23 on this machine (ANCHORS.md), 256 MiB object and 1,000 × 4 KiB files,
# one run; sizes differ from ours, so only the per-MiB rates and the small-file times carry over.
QUOTED_MOUNTPOINT = {
    "write_durable": (256 / 3.66, "70 (quoted, 256 MiB write+fsync 3.66 s)"),
    "write_s3": (256 / 4.34, "59 (quoted, 256 MiB in S3 4.34 s)"),
    "read_cold": (256 / 1.52, "168 (quoted, 256 MiB cold 1.52 s)"),
    "small_close": (22.85, "22.85 (quoted, 1000 files)"),
    "small_s3": (24.14, "24.14 (quoted, 1000 files)"),
    "small_ls": (0.09, "0.09 (quoted, 1000 files)"),
    "many_ls": (1.0, "1.0 (quoted: its CI, `ls` 10k, EC2)"),
    "rss": (None, "600–740 (quoted)"),
}


class Bench:
    def __init__(self, args):
        self.args = args
        self.work = args.work
        self.endpoint = os.environ["BUCKETFS_TEST_SEAWEEDFS_ENDPOINT"]
        self.key = os.environ["BUCKETFS_TEST_SEAWEEDFS_ACCESS_KEY"]
        self.secret = os.environ["BUCKETFS_TEST_SEAWEEDFS_SECRET_KEY"]
        self.size = args.size_mib * MiB
        self.tools = args.tools
        self.buckets = {t: f"bench-{t}" for t in ALL_TOOLS if t != "local"}
        self.results = {t: {m[0]: [] for m in METRICS} for t in ALL_TOOLS}
        self.failures = {}  # (tool, metric) -> [messages]
        self.issues = []
        self.log_lines = {}  # bucketfs WARN/ERROR message -> count
        self.mount_seq = 0
        self.mounts = []
        self.bucketfs_bin = args.bucketfs_bin
        self.bucketfs_args = args.bucketfs_args.split() if args.bucketfs_args else []
        self.local = os.path.join(self.work, "local")
        for d in ("logs", "mnt", "cache", "local"):
            os.makedirs(os.path.join(self.work, d), exist_ok=True)
        self.s3fs_passwd = os.path.join(self.work, "s3fs.passwd")
        fd = os.open(self.s3fs_passwd, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, f"{self.key}:{self.secret}\n".encode())
        os.close(fd)
        self.rclone_conf = os.path.join(self.work, "rclone.conf")
        fd = os.open(self.rclone_conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.write(fd, (f"[bench]\ntype = s3\nprovider = Other\naccess_key_id = {self.key}\n"
                      f"secret_access_key = {self.secret}\nendpoint = {self.endpoint}\n"
                      "force_path_style = true\nregion = us-east-1\n").encode())
        os.close(fd)
        self.s3 = self._client()
        import boto3.s3.transfer
        self.tconf = boto3.s3.transfer.TransferConfig(
            multipart_threshold=8 * MiB, multipart_chunksize=8 * MiB,
            max_concurrency=args.sdk_concurrency, use_threads=True)

    def _client(self):
        import boto3
        from botocore.config import Config
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.key,
            aws_secret_access_key=self.secret, region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, max_pool_connections=64,
                          retries={"max_attempts": 5, "mode": "standard"},
                          request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"))

    # -- bookkeeping ---------------------------------------------------------------------
    def note_pid(self, pid):
        with open(os.path.join(self.work, "pids"), "a") as f:
            f.write(f"{pid}\n")

    def issue(self, msg):
        log("ISSUE: " + msg)
        self.issues.append(msg)

    def record(self, tool, metric, value):
        self.results[tool][metric].append(value)

    def fail(self, tool, metric, exc):
        log(f"{tool}: {metric}: {exc}")
        self.failures.setdefault((tool, metric), []).append(str(exc))

    def big_timeout(self):
        return self.args.op_timeout or 60 + self.args.size_mib * 0.25

    def small_timeout(self):
        return self.args.op_timeout or 300

    # -- S3 helpers ----------------------------------------------------------------------
    def wait_object(self, bucket, key, size, t0, timeout):
        """Seconds from t0 until HeadObject shows key with `size` bytes."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                h = self.s3.head_object(Bucket=bucket, Key=key)
                if h["ContentLength"] == size:
                    return time.monotonic() - t0
            except self.s3.exceptions.ClientError:
                pass
            if time.monotonic() > deadline:
                raise S3Timeout(f"{key} not in S3 with {size} bytes after {timeout:.0f}s")
            time.sleep(POLL)

    def count_objects(self, bucket, prefix, size=None):
        n = 0
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for o in page.get("Contents", []):
                if not o["Key"].endswith("/") and (size is None or o["Size"] == size):
                    n += 1
        return n

    def wait_prefix(self, bucket, prefix, count, t0, timeout):
        deadline = time.monotonic() + timeout
        while True:
            if self.count_objects(bucket, prefix, SMALL_SIZE) >= count:
                return time.monotonic() - t0
            if time.monotonic() > deadline:
                raise S3Timeout(f"{prefix}: fewer than {count} objects in S3 after {timeout:.0f}s")
            time.sleep(POLL * 2)

    def delete_prefix(self, bucket, prefix):
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                self.s3.delete_objects(Bucket=bucket, Delete={"Objects": keys, "Quiet": True})

    def put_many(self, bucket, keys, body):
        with cf.ThreadPoolExecutor(self.args.sdk_small_concurrency) as ex:
            list(ex.map(lambda k: self.s3.put_object(Bucket=bucket, Key=k, Body=body), keys))

    # -- setup ---------------------------------------------------------------------------
    def setup(self):
        # SeaweedFS does not reclaim deleted objects' space during a run: every big write stays.
        mounts = [t for t in self.tools if t in LIVE_MOUNTS]
        need = self.size * (2 * self.args.runs * (len(mounts) + 1) + len(self.buckets) + 4) + 2 * 1024 * MiB
        free = shutil.disk_usage(self.work).free
        if free < need:
            raise SystemExit(f"{self.work}: {free / 2**30:.0f} GiB free, this run needs about "
                             f"{need / 2**30:.0f} GiB (use --size-mib, --runs or BENCH_WORK_PARENT)")
        log(f"writing the {self.args.size_mib} MiB source file")
        src = os.path.join(self.local, BIG_KEY)
        run_op(["write", src, self.size, "1"], self.big_timeout())
        self.source = src
        many = self.args.many
        os.makedirs(os.path.join(self.local, "many"), exist_ok=True)
        blob = b"x" * LS_OBJECT_SIZE
        for i in range(many):
            with open(os.path.join(self.local, "many", f"obj{i:05d}"), "wb") as f:
                f.write(blob)
        names = [f"{MANY_PREFIX}obj{i:05d}" for i in range(many)]
        for tool in self.tools:
            if tool == "local":
                continue
            bucket = self.buckets[tool]
            deadline = time.monotonic() + 60
            while True:
                try:
                    self.s3.create_bucket(Bucket=bucket)
                    break
                except Exception as e:  # the filer may not be ready yet
                    if "BucketAlreadyOwnedByYou" in str(e):
                        break
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)
            log(f"{bucket}: uploading {BIG_KEY} and {many} objects under {MANY_PREFIX}")
            self.s3.upload_file(src, bucket, BIG_KEY, Config=self.tconf)
            self.s3.put_object(Bucket=bucket, Key=MANY_PREFIX, Body=b"")
            self.put_many(bucket, names, blob)
            n = self.count_objects(bucket, MANY_PREFIX)
            if n != many:
                raise SystemExit(f"{bucket}: {n} objects under {MANY_PREFIX}, expected {many}")

    # -- SDK baseline ----------------------------------------------------------------------
    def run_sdk(self, r):
        b, size, mib = self.buckets["sdk"], self.size, self.args.size_mib
        n = self.args.small_files
        for metric, fsync in (("write_close", False), ("write_durable", True)):
            t0 = time.monotonic()
            self.s3.upload_file(self.source, b, f"w{r}-{int(fsync)}.bin", Config=self.tconf)
            dt = time.monotonic() - t0
            self.record("sdk", metric, mib / dt)
            if not fsync:
                self.record("sdk", "write_s3", mib / dt)
        self.delete_prefix(b, f"w{r}-")
        drop_caches()
        self.record("sdk", "read_cold", mib / self.sdk_download(b, BIG_KEY, size))
        self.record("sdk", "read_warm", mib / self.sdk_download(b, BIG_KEY, size))
        body = _pattern(SMALL_SIZE, r)
        keys = [f"s{r}/f{i:05d}" for i in range(n)]
        t0 = time.monotonic()
        self.put_many(b, keys, body)
        dt = time.monotonic() - t0
        self.record("sdk", "small_close", dt)
        self.record("sdk", "small_s3", dt)
        drop_caches()
        t0 = time.monotonic()
        listed = [o["Key"] for p in self.s3.get_paginator("list_objects_v2").paginate(Bucket=b, Prefix=f"s{r}/")
                  for o in p.get("Contents", [])]
        self.record("sdk", "small_ls", time.monotonic() - t0)
        t0 = time.monotonic()
        with cf.ThreadPoolExecutor(self.args.sdk_small_concurrency) as ex:
            total = sum(ex.map(lambda k: len(self.s3.get_object(Bucket=b, Key=k)["Body"].read()), listed))
        self.record("sdk", "small_read", time.monotonic() - t0)
        assert total == n * SMALL_SIZE, total
        t0 = time.monotonic()
        count = sum(len(p.get("Contents", [])) for p in
                    self.s3.get_paginator("list_objects_v2").paginate(Bucket=b, Prefix=MANY_PREFIX))
        self.record("sdk", "many_ls", time.monotonic() - t0)
        assert count == self.args.many + 1, count
        drop_caches()
        rng = random.Random(r)
        offsets = [rng.randrange(size // 4096) * 4096 for _ in range(self.args.random_reads)]
        t0 = time.monotonic()
        for off in offsets:
            got = self.s3.get_object(Bucket=b, Key=BIG_KEY, Range=f"bytes={off}-{off + 4095}")["Body"].read()
            assert len(got) == 4096
        self.record("sdk", "randread", len(offsets) / (time.monotonic() - t0))
        self.delete_prefix(b, f"s{r}/")

    def sdk_download(self, bucket, key, size):
        """Parallel ranged GETs (8 MiB ranges, sdk_concurrency in flight), bodies discarded."""
        part = 8 * MiB
        ranges = [(o, min(o + part, size) - 1) for o in range(0, size, part)]

        def get(rg):
            body = self.s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={rg[0]}-{rg[1]}")["Body"]
            n = 0
            while True:
                chunk = body.read(MiB)
                if not chunk:
                    return n
                n += len(chunk)

        t0 = time.monotonic()
        with cf.ThreadPoolExecutor(self.args.sdk_concurrency) as ex:
            total = sum(ex.map(get, ranges))
        dt = time.monotonic() - t0
        assert total == size, total
        return dt

    # -- local disk baseline ---------------------------------------------------------------
    def run_local(self, r):
        d, size, mib, n = self.local, self.size, self.args.size_mib, self.args.small_files
        t = self.big_timeout()
        res = run_op(["write", os.path.join(d, f"w{r}.bin"), size, "0"], t)
        self.record("local", "write_close", mib / res["close"])
        res = run_op(["write", os.path.join(d, f"f{r}.bin"), size, "1"], t)
        self.record("local", "write_durable", mib / res["close"])
        for f in (f"w{r}.bin", f"f{r}.bin"):
            os.unlink(os.path.join(d, f))
        drop_caches()
        self.record("local", "read_cold", mib / run_op(["read", self.source, size], t)["elapsed"])
        self.record("local", "read_warm", mib / run_op(["read", self.source, size], t)["elapsed"])
        sd = os.path.join(d, f"s{r}")
        self.record("local", "small_close", run_op(["smallwrite", sd, n], self.small_timeout())["close"])
        subprocess.run(["sync", "-f", sd], check=True)
        drop_caches()
        self.record("local", "small_ls", run_op(["ls", sd, n], self.small_timeout())["elapsed"])
        self.record("local", "small_read", run_op(["smallread", sd, n], self.small_timeout())["elapsed"])
        drop_caches()
        self.record("local", "many_ls", run_op(["ls", os.path.join(d, "many"), self.args.many],
                                               self.small_timeout())["elapsed"])
        drop_caches()
        res = run_op(["randread", self.source, size, self.args.random_reads, r], t)
        self.record("local", "randread", self.args.random_reads / res["elapsed"])
        shutil.rmtree(sd)

    # -- a mounted tool ----------------------------------------------------------------------
    def run_mount(self, tool, r):
        """Three fresh mounts, each on an empty cache: writes; reads and listings; random reads."""
        bucket, size, mib, n = self.buckets[tool], self.size, self.args.size_mib, self.args.small_files
        tb, ts = self.big_timeout(), self.small_timeout()
        stats = []  # (peak RSS, CPU) of each mount

        def phase(metrics, body):
            m = Mount(self, tool)
            self.mounts.append(m)
            try:
                m.start()
            except OpFailed as e:
                for metric in metrics:
                    self.fail(tool, metric, f"mount failed: {e}")
                return
            try:
                body(m)
            finally:
                m.sample()
                if m.peak_rss is not None:
                    stats.append((m.peak_rss, m.cpu or 0.0))
                m.stop()
                self.scan_log(m)

        def step(m, metrics, fn):
            if not m.mounted:
                for metric in metrics:
                    self.fail(tool, metric, "skipped: the mount was aborted earlier in this phase")
                return
            try:
                fn()
            except OpFailed as e:
                for metric in metrics:
                    self.fail(tool, metric, e)
                if isinstance(e, OpTimeout) and m.mounted:
                    m.abort()

        def writes(m):
            def small():
                res = run_op(["smallwrite", os.path.join(m.mnt, f"s{r}"), n], ts, m.abort)
                self.record(tool, "small_close", res["close"])
                self.record(tool, "small_s3", self.wait_prefix(bucket, f"s{r}/", n, res["t0"], ts))
            step(m, ["small_close", "small_s3"], small)

            def write(fsync):
                key = f"w{r}-{int(fsync)}.bin"
                res = run_op(["write", os.path.join(m.mnt, key), size, "1" if fsync else "0"], tb, m.abort)
                in_s3 = self.wait_object(bucket, key, size, res["t0"], tb)
                if fsync:
                    self.record(tool, "write_durable", mib / max(res["close"], in_s3))
                    if in_s3 > res["close"] + 0.2:
                        log(f"{tool}: fsync returned at {res['fsync']:.2f}s, the object was in S3 at {in_s3:.2f}s")
                else:
                    self.record(tool, "write_close", mib / res["close"])
                    self.record(tool, "write_s3", mib / in_s3)
            step(m, ["write_close", "write_s3"], lambda: write(False))
            step(m, ["write_durable"], lambda: write(True))

        def reads(m):
            drop_caches()
            sd = os.path.join(m.mnt, f"s{r}")
            step(m, ["small_ls"], lambda: self.record(
                tool, "small_ls", run_op(["ls", sd, n], ts, m.abort)["elapsed"]))
            step(m, ["small_read"], lambda: self.record(
                tool, "small_read", run_op(["smallread", sd, n], ts, m.abort)["elapsed"]))
            step(m, ["many_ls"], lambda: self.record(tool, "many_ls", run_op(
                ["ls", os.path.join(m.mnt, "many"), self.args.many], ts, m.abort)["elapsed"]))
            drop_caches()
            big = os.path.join(m.mnt, BIG_KEY)
            step(m, ["read_cold"], lambda: self.record(
                tool, "read_cold", mib / run_op(["read", big, size], tb, m.abort)["elapsed"]))
            step(m, ["read_warm"], lambda: self.record(
                tool, "read_warm", mib / run_op(["read", big, size], tb, m.abort)["elapsed"]))

        def randreads(m):
            drop_caches()
            k = self.args.random_reads
            step(m, ["randread"], lambda: self.record(tool, "randread", k / run_op(
                ["randread", os.path.join(m.mnt, BIG_KEY), size, k, r], tb, m.abort)["elapsed"]))

        phase(["small_close", "small_s3", "write_close", "write_s3", "write_durable"], writes)
        self.delete_prefix(bucket, f"w{r}-")
        phase(["small_ls", "small_read", "many_ls", "read_cold", "read_warm"], reads)
        self.delete_prefix(bucket, f"s{r}/")
        phase(["randread"], randreads)
        if stats:
            self.record(tool, "rss", max(s[0] for s in stats))
            self.record(tool, "cpu", sum(s[1] for s in stats))

    def scan_log(self, m):
        """Collects bucketfs's WARN and ERROR log lines (deduplicated) for the report."""
        if m.tool != "bucketfs" or not os.path.exists(m.logpath):
            return
        with open(m.logpath, errors="replace") as f:
            for line in f:
                if " WARN " in line or " ERROR " in line or "panicked" in line:
                    msg = line.strip().split(None, 1)[-1]  # without the timestamp
                    msg = re.sub(r"/var/tmp/bucketfs-bench\.\w+", "WORK", msg)[:160]
                    self.log_lines[msg] = self.log_lines.get(msg, 0) + 1

    def cleanup(self):
        for m in self.mounts:
            if m.mounted or mountinfo_entry(m.mnt):
                log(f"cleanup: unmounting {m.mnt}")
                try:
                    m.stop()
                except Exception as e:  # noqa: BLE001 - best effort on the way out
                    log(f"cleanup: {m.mnt}: {e}; aborting")
                    m.abort()

    # -- report ----------------------------------------------------------------------------
    def median(self, tool, metric):
        v = self.results[tool][metric]
        return statistics.median(v) if v else None

    def cell(self, tool, metric):
        v = self.median(tool, metric)
        if v is None:
            fails = self.failures.get((tool, metric))
            if fails:
                return "timeout" if any("timed out" in f or "not in S3" in f or "fewer than" in f
                                        for f in fails) else "failed"
            return "—"
        vals = self.results[tool][metric]
        nfail = len(self.failures.get((tool, metric), []))
        s = fmt(v)
        if nfail:
            s += f" ({len(vals)} ok, {nfail} failed)"
        return s

    def report(self, meta):
        big = f"{self.args.size_mib} MiB" if self.args.size_mib % 1024 else f"{self.args.size_mib // 1024} GiB"
        cols = [t for t in ALL_TOOLS if t in self.tools] + ["mountpoint"]
        head = ["workload", "unit"] + [COLUMN[c] for c in cols] + ["bucketfs ÷ raw SDK", "bucketfs ÷ best rival"]
        lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for metric, label, unit, higher in METRICS:
            row = [label.format(big=big, n=f"{self.args.small_files:,}", many=f"{self.args.many:,}"), unit]
            for c in cols:
                if c == "mountpoint":
                    row.append(QUOTED_MOUNTPOINT.get(metric, (None, "—"))[1])
                else:
                    row.append(self.cell(c, metric))
            bfs = self.median("bucketfs", metric)
            sdk = self.median("sdk", metric)
            row.append(ratio(bfs, sdk, higher) if metric not in ("rss", "cpu") else "—")
            rivals = [(self.median(t, metric), t) for t in RIVALS if t in self.tools]
            rivals = [x for x in rivals if x[0] is not None]
            if bfs is not None and rivals:
                best = max(rivals) if higher else min(rivals)
                row.append(f"{ratio(bfs, best[0], higher)} ({COLUMN[best[1]]})")
            else:
                row.append("—")
            lines.append("| " + " | ".join(row) + " |")
        table = "\n".join(lines)
        targets = self.targets()
        out = [f"# bucketfs benchmark — {meta['date']}", "",
               f"Command: `{meta['command']}`", "",
               "Machine: " + meta["machine"], "",
               "Versions: " + meta["versions"], "",
               f"Medians of {self.args.runs} run(s). Ratios are speed ratios: above 1 means bucketfs is faster "
               "(for times: the other's time ÷ bucketfs's; for rates: bucketfs's ÷ the other's; "
               "for RSS and CPU, lower is better: the rival's figure ÷ bucketfs's, above 1 means bucketfs uses less). "
               "The best rival is the fastest live rival (s3fs, rclone); mountpoint-s3's column is quoted "
               "from ANCHORS.md (a different size, one run) and is not used in ratios.", "",
               table, "", "Targets from the issue:", ""] + targets
        if self.failures:
            out += ["", "Failures:", ""]
            for (tool, metric), msgs in sorted(self.failures.items()):
                out.append(f"- {tool} / {metric}: " + "; ".join(sorted(set(msgs)))[:500])
        if self.issues:
            out += ["", "Issues noticed during the run:", ""] + [f"- {i}" for i in self.issues]
        if self.log_lines:
            out += ["", f"bucketfs WARN/ERROR log lines over {self.mount_seq} mounts (all tools):", ""]
            out += [f"- {n}× `{msg.replace('`', chr(39))}`" for msg, n in
                    sorted(self.log_lines.items(), key=lambda x: -x[1])]
        out += ["", "Per-run values: the JSON file beside this one.", ""]
        return "\n".join(out)

    def targets(self):
        m = self.median
        t = []

        def check(name, ok, detail):
            if ok is None:
                t.append(f"- {name}: not measured ({detail})")
            else:
                t.append(f"- {name}: **{'met' if ok else 'MISSED'}** — {detail}")

        live = [x for x in RIVALS if x in self.tools]
        bd, sd = m("bucketfs", "write_durable"), m("sdk", "write_durable")
        rd = [m(x, "write_durable") for x in live]
        if bd and sd:
            ok = bd >= 0.9 * sd and all(v is None or bd > v for v in rd)
            check("write until durable ≥ 0.9× raw SDK and faster than every rival", ok,
                  f"bucketfs {fmt(bd)} MiB/s = {bd / sd:.2f}× SDK ({fmt(sd)}); rivals "
                  + ", ".join(f"{x} {fmt(m(x, 'write_durable'))}" for x in live))
        else:
            check("write until durable", None, "missing figures")
        bc, sc = m("bucketfs", "read_cold"), m("sdk", "read_cold")
        if bc and sc:
            check("cold read ≥ 0.9× raw SDK", bc >= 0.9 * sc, f"{fmt(bc)} vs {fmt(sc)} MiB/s = {bc / sc:.2f}×")
        bs, s3fs, loc = m("bucketfs", "small_close"), m("s3fs", "small_close"), m("local", "small_close")
        if bs and s3fs:
            check("small files until close ≥ 10× the fastest rival that uploads at close (s3fs)", s3fs / bs >= 10,
                  f"bucketfs {fmt(bs)} s, s3fs {fmt(s3fs)} s = {s3fs / bs:.1f}× (mountpoint-s3, quoted: 22.85 s)")
        if bs and loc:
            check("small files until close ≤ 2× local disk", bs <= 2 * loc,
                  f"bucketfs {fmt(bs)} s, local disk {fmt(loc)} s = {bs / loc:.1f}× local")
        b3 = m("bucketfs", "small_s3")
        r3 = [(m(x, "small_s3"), x) for x in live]
        if b3:
            check("small files until in S3 faster than every rival",
                  all(v is None or b3 < v for v, _ in r3),
                  f"bucketfs {fmt(b3)} s; " + ", ".join(f"{x} {fmt(v)}" for v, x in r3))
        bl, sl = m("bucketfs", "many_ls"), m("sdk", "many_ls")
        if bl and sl:
            check(f"`ls -l` of {self.args.many:,} ≤ 1.3× raw SDK (paged LIST)", bl <= 1.3 * sl,
                  f"{fmt(bl)} s vs {fmt(sl)} s = {bl / sl:.2f}×")
        bw, lw = m("bucketfs", "read_warm"), m("local", "read_warm")
        if bw and lw:
            check("warm re-read ≥ 0.8× local disk", bw >= 0.8 * lw, f"{fmt(bw)} vs {fmt(lw)} MiB/s = {bw / lw:.2f}×")
        return t


def fmt(v):
    if v is None:
        return "—"
    if v >= 100:
        return f"{v:,.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def ratio(bfs, other, higher):
    if bfs is None or other is None or bfs == 0 or other == 0:
        return "—"
    r = bfs / other if higher else other / bfs
    return f"{r:.2f}×"


def tool_versions(bin_path):
    def first(cmd):
        try:
            r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=20, env=clean_env())
            return r.stdout.decode(errors="replace").strip().splitlines()[0]
        except Exception:  # noqa: BLE001
            return "?"
    import boto3
    rev = first(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL).stdout.strip()
    weed = os.environ.get("BENCH_WEED_VERSION", "SeaweedFS ?")
    s3fs = re.search(r"V(\d[\d.]*)", first(["s3fs", "--version"]))
    built = datetime.datetime.fromtimestamp(os.path.getmtime(bin_path), datetime.timezone.utc)
    return (f"bucketfs {first([bin_path, '--version']).split()[-1]} (binary built {built:%Y-%m-%d %H:%M} UTC; "
            f"tree at git {rev}{' with uncommitted changes' if dirty else ''}), "
            f"s3fs {s3fs.group(1) if s3fs else '?'}, {first(['rclone', 'version'])}, {weed}, "
            f"boto3 {boto3.__version__}")


def machine():
    with open("/etc/debian_version") as f:
        deb = f.read().strip()
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = 0
    with open("/proc/meminfo") as f:
        mem = int(f.readline().split()[1]) // 1024 // 1024
    return (f"{os.cpu_count()} CPUs (`nproc` {len(os.sched_getaffinity(0))}, {cpu}), {mem} GiB RAM, "
            f"Debian {deb}, kernel {platform.release()}; SeaweedFS on loopback; shared machine")


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "op":
        op_main(sys.argv[2:])
        return
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", help="scratch directory (mounts, caches, logs); run.sh makes one")
    p.add_argument("--runs", type=int, help="runs per tool (3; --quick: 1)")
    p.add_argument("--size-mib", type=int, help="size of the big file in MiB (1024; --quick: 64)")
    p.add_argument("--small-files", type=int, help="number of 4 KiB files (1000; --quick: 200)")
    p.add_argument("--many", type=int, help="objects in the listed directory (10000; --quick: 1000)")
    p.add_argument("--random-reads", type=int, help="random 4 KiB preads (1000; --quick: 200)")
    p.add_argument("--quick", action="store_true", help="smoke test: smaller defaults (a few minutes)")
    p.add_argument("--tools", default=",".join(ALL_TOOLS), help="comma-separated subset of " + ",".join(ALL_TOOLS))
    p.add_argument("--sdk-concurrency", type=int, default=8, help="parts/ranges in flight for the SDK")
    p.add_argument("--sdk-small-concurrency", type=int, default=16, help="small requests in flight for the SDK")
    p.add_argument("--op-timeout", type=float, default=0, help="override every operation's timeout (s)")
    p.add_argument("--drain-timeout", type=float, default=300, help="wait this long for a daemon to exit after umount")
    p.add_argument("--bucketfs-bin", default=os.path.join(ROOT, "target/release/bucketfs"))
    p.add_argument("--bucketfs-args", default="", help="extra flags for bucketfs mount")
    p.add_argument("--out", default=None, help="markdown output (default bench/results/latest.md, quick.md with --quick)")
    p.add_argument("--command", default=None, help=argparse.SUPPRESS)
    p.add_argument("--from-json", metavar="FILE", help="only re-render the table of an earlier run's JSON")
    if "--from-json" in sys.argv:
        a = p.parse_known_args()[0]
        with open(a.from_json) as f:
            saved = json.load(f)
        bench = Bench.__new__(Bench)
        bench.args = argparse.Namespace(**saved["args"])
        bench.tools, bench.results, bench.issues = bench.args.tools, saved["results"], saved["issues"]
        bench.failures = {tuple(k.split("/", 1)): v for k, v in saved["failures"].items()}
        bench.log_lines = saved.get("bucketfs_log", {})
        bench.mount_seq = saved.get("mounts", 0)
        md = bench.report(saved["meta"]) + f"\nTotal run time: {saved['meta'].get('duration', '?')}.\n"
        out = a.out or os.path.splitext(a.from_json)[0] + ".md"
        with open(out, "w") as f:
            f.write(md)
        print(md)
        return
    p.set_defaults(work=None)
    args = p.parse_args()
    if not args.work:
        p.error("--work is required")
    defaults = dict(runs=(3, 1), size_mib=(1024, 64), small_files=(1000, 200), many=(10000, 1000),
                    random_reads=(1000, 200))
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.tools = [t for t in args.tools.split(",") if t]
    bad = [t for t in args.tools if t not in ALL_TOOLS]
    if bad:
        p.error(f"unknown tools: {bad}")
    if "sdk" not in args.tools:
        args.tools.insert(0, "sdk")
    out = args.out or os.path.join(HERE, "results", "quick.md" if args.quick else "latest.md")
    os.makedirs(os.path.dirname(out), exist_ok=True)

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    bench = Bench(args)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": args.command or " ".join(sys.argv),
            "machine": machine(), "versions": tool_versions(args.bucketfs_bin)}
    started = time.monotonic()
    try:
        bench.setup()
        for r in range(args.runs):
            for tool in args.tools:
                log(f"run {r + 1}/{args.runs}: {tool}")
                t = time.monotonic()
                try:
                    if tool == "sdk":
                        bench.run_sdk(r)
                    elif tool == "local":
                        bench.run_local(r)
                    else:
                        bench.run_mount(tool, r)
                except OpFailed as e:
                    bench.fail(tool, "run", e)
                log(f"run {r + 1}/{args.runs}: {tool} took {time.monotonic() - t:.0f}s")
    finally:
        bench.cleanup()
    meta["duration"] = f"{(time.monotonic() - started) / 60:.1f} min"
    md = bench.report(meta) + f"\nTotal run time: {meta['duration']}.\n"
    with open(out, "w") as f:
        f.write(md)
    with open(os.path.splitext(out)[0] + ".json", "w") as f:
        json.dump({"meta": meta, "args": {k: v for k, v in vars(args).items()},
                   "results": bench.results,
                   "failures": {f"{t}/{m}": v for (t, m), v in bench.failures.items()},
                   "issues": bench.issues, "bucketfs_log": bench.log_lines,
                   "mounts": bench.mount_seq}, f, indent=1)
    print(md)
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
