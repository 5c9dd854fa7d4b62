#!/usr/bin/env bash
# How fast `stat` answers while a 1 GiB upload runs (issue 6: a slow S3 call must never block
# unrelated operations). Mounts bucketfs on a local SeaweedFS with a metadata TTL of 0 (the
# kernel asks the daemon at every `stat`) and a long write-back delay, then runs
# bench/stat_during_upload.py: `stat` of a file with local changes (answered from the daemon's
# memory) and of a file only in S3 (a HEAD each), idle and while SIZE_MIB is written and
# fsync'd. Run by hand as root:
#
#   sudo bench/stat-during-upload.sh [SIZE_MIB]      # default 1024
#
# Needs what bench/run.sh installs (the boto3 venv, SeaweedFS); see docs/BENCHMARKS.md.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SIZE_MIB=${1:-1024}
PY=${BUCKETFS_TOOLS:-$HOME/.cache/bucketfs-tools}/bench/bin/python
BIN=${BUCKETFS_BIN:-$ROOT/target/release/bucketfs}
WORK=$(mktemp -d /var/tmp/bucketfs-stat.XXXXXX)

cleanup() {
  umount -l "$WORK/mnt" 2>/dev/null || true
  "$ROOT/scripts/s3-servers.sh" stop "$WORK/servers" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT

[ -x "$PY" ] || { echo "run bench/run.sh --quick once first (it installs boto3)" >&2; exit 1; }
"$ROOT/scripts/s3-servers.sh" start "$WORK/servers" >/dev/null
for v in $(env | grep -o '^AWS_[A-Z_]*' || true); do unset "$v"; done
# shellcheck disable=SC1091
. "$WORK/servers/env"
export S3_ACCESS_KEY_ID=$BUCKETFS_TEST_SEAWEEDFS_ACCESS_KEY
export S3_SECRET_ACCESS_KEY=$BUCKETFS_TEST_SEAWEEDFS_SECRET_KEY
ENDPOINT=$BUCKETFS_TEST_SEAWEEDFS_ENDPOINT
BUCKET=stat-$RANDOM
mkdir -p "$WORK/mnt"
"$PY" - "$ENDPOINT" "$BUCKET" <<'EOF'
import sys, os, boto3
c = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                 aws_access_key_id=os.environ["S3_ACCESS_KEY_ID"],
                 aws_secret_access_key=os.environ["S3_SECRET_ACCESS_KEY"])
c.create_bucket(Bucket=sys.argv[2])
c.put_object(Bucket=sys.argv[2], Key="remote.txt", Body=b"hello")
EOF
"$BIN" mount "s3://$BUCKET" "$WORK/mnt" --endpoint-url "$ENDPOINT" --cache-dir "$WORK/cache" \
  --metadata-ttl 0s --writeback-delay 1h --daemon 2>"$WORK/bucketfs.log"

"$PY" "$ROOT/bench/stat_during_upload.py" "$WORK/mnt" "$SIZE_MIB"
