#!/usr/bin/env bash
# The bucketfs benchmark: bucketfs against s3fs, rclone mount (--vfs-cache-mode writes and
# full), the raw SDK (boto3) and the local disk, all on one SeaweedFS server on loopback.
# Run by hand as root (FUSE mounts, drop_caches); not part of CI. See docs/BENCHMARKS.md.
#
#   sudo bench/run.sh --quick                    # smoke test: 1 run, 64 MiB, 200 files (~5 min)
#   sudo bench/run.sh                            # 3 runs, 1 GiB, 1,000 files, 10,000 objects
#   sudo bench/run.sh --runs 5 --size-mib 512 --tools bucketfs,s3fs
#   bench/run.sh --help                          # every option of the driver (bench/bench.py)
#
# Writes the table to bench/results/latest.md (quick.md with --quick) and the per-run figures
# beside it as JSON. BENCH_KEEP_WORK=1 keeps the scratch directory (logs of every daemon).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TOOLS=${BUCKETFS_TOOLS:-$HOME/.cache/bucketfs-tools}
VENV=$TOOLS/bench
BIN=${BUCKETFS_BIN:-$ROOT/target/release/bucketfs}

log() { printf '[bench] %s\n' "$*" >&2; }

for a in "$@"; do
  if [ "$a" = -h ] || [ "$a" = --help ]; then
    exec python3 "$ROOT/bench/bench.py" --help
  fi
done

[ "$(id -u)" -eq 0 ] || { log "run as root (FUSE mounts and drop_caches)"; exit 1; }
[ -e /dev/fuse ] || { log "/dev/fuse is missing"; exit 1; }

# Rivals and helpers from apt, only what is missing.
need=()
command -v s3fs >/dev/null || need+=(s3fs)
command -v rclone >/dev/null || need+=(rclone)
command -v fusermount3 >/dev/null || command -v fusermount >/dev/null || need+=(fuse3)
command -v curl >/dev/null || need+=(curl)
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  log "installing from apt: ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# boto3 for the raw-SDK baseline and for watching the bucket.
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c 'import boto3' 2>/dev/null; then
  log "installing boto3 into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q boto3
fi

if [ ! -x "$BIN" ]; then
  log "building $BIN"
  (cd "$ROOT" && cargo build --release --locked --bin bucketfs)
fi

WORK=$(mktemp -d "${BENCH_WORK_PARENT:-/var/tmp}/bucketfs-bench.XXXXXX")
mkdir -p "$WORK/bin"
# A copy, so that a rebuild during the run cannot swap the binary under the benchmark.
cp -p "$BIN" "$WORK/bin/bucketfs"

cleanup() {
  local status=$? m pid
  trap - EXIT INT TERM
  # Whatever the driver left mounted (it unmounts on every path it controls).
  if [ -d "$WORK/mnt" ]; then
    while read -r m; do
      log "unmounting leftover $m"
      umount -l "$m" 2>/dev/null || true
    done < <(awk -v p="$WORK/mnt/" 'index($5, p) == 1 { print $5 }' /proc/self/mountinfo)
  fi
  # Daemons the driver started and that are still alive, by the pid it recorded.
  if [ -f "$WORK/pids" ]; then
    while read -r pid; do
      if [ -r "/proc/$pid/cmdline" ] && tr '\0' ' ' < "/proc/$pid/cmdline" | grep -qF "$WORK/"; then
        log "killing leftover daemon $pid"
        kill -KILL "$pid" 2>/dev/null || true
      fi
    done < "$WORK/pids"
  fi
  "$ROOT/scripts/s3-servers.sh" stop "$WORK/servers" || true
  if [ "${BENCH_KEEP_WORK:-0}" = 1 ] || [ "$status" -ne 0 ]; then
    log "scratch directory kept: $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The FUSE control filesystem lets the driver abort a hung mount's connection.
if [ -d /sys/fs/fuse/connections ] && ! grep -q ' /sys/fs/fuse/connections ' /proc/self/mountinfo; then
  mount -t fusectl fusectl /sys/fs/fuse/connections 2>/dev/null || true
fi

"$ROOT/scripts/s3-servers.sh" install
"$ROOT/scripts/s3-servers.sh" start "$WORK/servers"
# shellcheck disable=SC1091
. "$WORK/servers/env"

# No AWS_* variable reaches bucketfs, the rivals or boto3 (rclone refuses to start with the
# AWS_CA_BUNDLE this environment sets); the driver also strips them from every child.
while read -r v; do unset "$v"; done < <(compgen -e | grep '^AWS_' || true)

BENCH_WEED_VERSION="SeaweedFS $("$TOOLS/seaweedfs/bin/weed" version 2>/dev/null | awk '/version/ { print $3; exit }')"
export BENCH_WEED_VERSION

"$VENV/bin/python" "$ROOT/bench/bench.py" --work "$WORK" --bucketfs-bin "$WORK/bin/bucketfs" \
  --command "bench/run.sh${*:+ $*}" "$@"
