#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need (FUSE tools, the two
# local S3 servers), starts the servers on free loopback ports, runs every test (unit, store
# conformance, real mounts) in the release profile, and stops the servers on every exit path.
#
#   ./scripts/test.sh                # everything
#   ./scripts/test.sh --test mount   # extra arguments go to `cargo test`
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '[test] %s\n' "$*" >&2; }

# FUSE needs /dev/fuse; mounting needs root (fuser mounts without fusermount as root).
if [ ! -e /dev/fuse ]; then log "/dev/fuse is missing: the real-mount tests cannot run here"; exit 1; fi
need_apt=()
command -v curl >/dev/null || need_apt+=(curl)
command -v umount >/dev/null || need_apt+=(mount)
python3 -c 'import venv, ensurepip' 2>/dev/null || need_apt+=(python3-venv)
# tests/ops.rs: systemd-analyze verifies the unit; mount(8) runs the fstab helper.
command -v systemd-analyze >/dev/null || need_apt+=(systemd)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

scripts/s3-servers.sh install

state=$(mktemp -d /tmp/bucketfs-test.XXXXXX)
cleanup() {
  scripts/s3-servers.sh stop "$state" || true
  # A test that died mid-way may leave a mount under /tmp: never leave a dead mount behind.
  grep -o " /tmp/[^ ]*/mnt " /proc/self/mountinfo 2>/dev/null | while read -r m; do umount -l "$m" || true; done || true
  rm -rf "$state"
}
trap cleanup EXIT

scripts/s3-servers.sh start "$state"
# Tests must not depend on ambient AWS settings (the machine sets AWS_CA_BUNDLE, for one).
for v in $(env | grep -o '^AWS_[A-Z_]*' || true); do unset "$v"; done
# shellcheck disable=SC1091
. "$state/env"

log "cargo test --release $*"
cargo test --release --locked "$@"
