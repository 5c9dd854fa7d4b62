#!/usr/bin/env bash
# Build bucketfs and mount something to try right away, in the foreground (Ctrl-C unmounts).
#
# With S3_BUCKET_NAME (and the other S3_* variables of docs/CONFIGURATION.md) set, it mounts that
# bucket; otherwise the embedded default: a local directory used as a bucket
# (file:///tmp/bucketfs-demo/bucket), no S3 needed.
#
#   ./scripts/demo.sh [MOUNTPOINT]      # default /tmp/bucketfs-demo/mnt; run as root
set -euo pipefail
cd "$(dirname "$0")/.."
demo=/tmp/bucketfs-demo
mnt=${1:-$demo/mnt}
cargo build --release --locked
mkdir -p "$mnt"
if [ -n "${S3_BUCKET_NAME:-}" ]; then
  source=()
  what="s3://$S3_BUCKET_NAME/${S3_KEY_PREFIX:-}"
else
  source=("file://$demo/bucket")
  what="the local directory store $demo/bucket (set S3_BUCKET_NAME to mount a bucket)"
fi
echo "Mounting $what at $mnt. Try, in another shell:"
echo "  cp /etc/os-release $mnt/ && ls -l $mnt && cat $mnt/os-release"
echo "Ctrl-C uploads what is pending and unmounts."
exec ./target/release/bucketfs mount "${source[@]}" "$mnt" --cache-dir "$demo/cache"
