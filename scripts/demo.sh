#!/usr/bin/env bash
# Try synapse-s3-offload locally, on a throwaway media store and a local S3 server (s3s-fs).
# Nothing outside a temporary directory is touched; everything is removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib.sh
echo "==> Building"
build_release
work=$(mktemp -d /tmp/sso-demo.XXXXXX)
mkdir -p "$work/media"
trap 'kill $s3pid 2>/dev/null; rm -rf "$work"' EXIT
start_s3s "$work/s3" demo-bucket demo demosecret "$work/s3s.log"

mk() { mkdir -p "$(dirname "$work/media/$1")"; head -c "$2" /dev/urandom >"$work/media/$1"; }
echo "==> An existing media store: two files already there"
mk local_content/ab/cd/efghijklmnopqrstuv 200000
mk local_thumbnails/ab/cd/efghijklmnopqrstuv/32-32-image-png-crop 3000

# 0600 from the start, as the README asks of a config holding keys (no "readable by others" warning).
(umask 077 && cat >"$work/config.yaml") <<YAML
media_store_path: $work/media
state_dir: $work/state
s3:
  bucket: demo-bucket
  prefix: synapse/
  endpoint_url: http://127.0.0.1:$port
  access_key_id: demo
  secret_access_key: demosecret
YAML
show() { (cd "$work/s3/demo-bucket" && find . -type f | sed 's|^\./|  |' | sort); }
wait_for() { # key: waits up to 10 s for the object to appear
  for _ in $(seq 1 100); do [[ -f "$work/s3/demo-bucket/$1" ]] && return 0; sleep 0.1; done
  echo "!! $1 did not arrive" >&2; return 1
}

echo "==> Starting the daemon: synapse-s3-offload --config config.yaml run"
"$bin" --config "$work/config.yaml" run 2>"$work/daemon.log" &
dpid=$!
trap 'kill $dpid $s3pid 2>/dev/null; wait $dpid 2>/dev/null; rm -rf "$work"' EXIT
wait_for synapse/local_content/ab/cd/efghijklmnopqrstuv
echo "==> The startup scan uploaded the existing files:"; show

echo "==> Synapse writes new media, one in a brand-new AB/CD directory, plus a URL preview"
t0=$(date +%s%N)
mk local_content/Qx/7z/newmediaidnewmediaid 150000
mk remote_content/matrix.org/xy/zw/abcdefghijklmnop 90000
mk url_cache/2026-11-26/preview 1000
wait_for synapse/local_content/Qx/7z/newmediaidnewmediaid
wait_for synapse/remote_content/matrix.org/xy/zw/abcdefghijklmnop
echo "==> Arrived in $(( ($(date +%s%N) - t0) / 1000000 )) ms (url_cache is skipped by default):"; show

echo "==> Stopping the daemon (SIGTERM)"
kill -TERM $dpid; wait $dpid
echo "==> Daemon log:"; sed 's/^/  /' "$work/daemon.log"
echo "==> 'upload' (the one-shot backfill) now has nothing left to do:"
"$bin" --config "$work/config.yaml" upload
