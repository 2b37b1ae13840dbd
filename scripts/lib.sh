# Shared helpers of the demo and benchmark scripts (sourced, not run).

# Builds the release binary; sets $bin.
build_release() {
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
