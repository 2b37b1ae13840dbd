#!/usr/bin/env bash
# Try synapse-s3-offload locally, on a throwaway media store and a local S3 server (s3s-fs).
# Nothing outside a temporary directory is touched; everything is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
echo "==> Building"
cargo build --release --locked -q
bin="$CARGO_TARGET_DIR/release/synapse-s3-offload"
s3s=${SSO_S3S_FS:-$(command -v s3s-fs || echo "$HOME/.cargo/bin/s3s-fs")}
if [[ ! -x "$s3s" ]]; then
  echo "==> Installing the local S3 server s3s-fs (once, ~5 min)"
  cargo install s3s-fs --version 0.14.1 --features binary --locked
fi
work=$(mktemp -d /tmp/sso-demo.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
mkdir -p "$work/s3/demo-bucket" "$work/media"
"$s3s" --host 127.0.0.1 --port "$port" --access-key demo --secret-key demosecret "$work/s3" >"$work/s3s.log" 2>&1 &
s3pid=$!
trap 'kill $s3pid 2>/dev/null; rm -rf "$work"' EXIT

echo "==> Writing a few Synapse-style media files into $work/media"
mk() { mkdir -p "$(dirname "$work/media/$1")"; head -c "$2" /dev/urandom >"$work/media/$1"; }
mk local_content/ab/cd/efghijklmnopqrstuv 200000
mk local_thumbnails/ab/cd/efghijklmnopqrstuv/32-32-image-png-crop 3000
mk remote_content/matrix.org/xy/zw/abcdefghijklmnop 90000
mk url_cache/2026-11-26/preview 1000

cat >"$work/config.yaml" <<YAML
media_store_path: $work/media
state_dir: $work/state
s3:
  bucket: demo-bucket
  prefix: synapse/
  endpoint_url: http://127.0.0.1:$port
  access_key_id: demo
  secret_access_key: demosecret
YAML
echo "==> synapse-s3-offload --config config.yaml upload"
"$bin" --config "$work/config.yaml" upload
echo "==> Objects in the bucket (url_cache is skipped by default):"
(cd "$work/s3/demo-bucket" && find . -type f | sed 's|^\./|  |' | sort)
echo "==> Running upload again: everything is already recorded, no request is made"
"$bin" --config "$work/config.yaml" upload
