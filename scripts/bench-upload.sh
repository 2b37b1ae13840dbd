#!/usr/bin/env bash
# Benchmark of the one-shot `upload` (not a test; CI does not run it).
# Generates a seeded Synapse-like store, starts s3s-fs with its data on tmpfs, runs `upload` from an
# empty bucket under /usr/bin/time -v, and prints files/s, MB/s, CPU seconds and peak RSS.
#
# usage: scripts/bench-upload.sh [--files N] [--scale F] [--concurrency C]
set -euo pipefail
cd "$(dirname "$0")/.."
files=20000 scale=1.0 concurrency=8
while (($#)); do
  case "$1" in
    --files) files=$2; shift 2 ;;
    --scale) scale=$2; shift 2 ;;
    --concurrency) concurrency=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
. scripts/lib.sh
build_release
work=$(mktemp -d /var/tmp/sso-bench.XXXXXX)
s3root=$(mktemp -d /dev/shm/sso-bench-s3.XXXXXX)
trap 'kill $s3pid 2>/dev/null; rm -rf "$work" "$s3root"' EXIT
start_s3s "$s3root" bench bench benchsecret "$work/s3s.log"
python3 scripts/bench/gen_store.py "$work/media" --files "$files" --scale "$scale"
sync
cat >"$work/config.yaml" <<YAML
media_store_path: $work/media
state_dir: $work/state
s3:
  bucket: bench
  endpoint_url: http://127.0.0.1:$port
  access_key_id: bench
  secret_access_key: benchsecret
upload:
  concurrency: $concurrency
YAML
nfiles=$(find "$work/media" -type f | wc -l)
bytes=$(du -sb "$work/media" | cut -f1)
/usr/bin/time -v -o "$work/time.txt" "$bin" --config "$work/config.yaml" upload --no-progress 2>"$work/run.log" >"$work/summary.txt" \
  || { cat "$work/run.log" >&2; exit 1; }
wall=$(grep -oP 'Elapsed \(wall clock\) time.*: \K.*' "$work/time.txt")
user=$(grep -oP 'User time \(seconds\): \K.*' "$work/time.txt")
sys=$(grep -oP 'System time \(seconds\): \K.*' "$work/time.txt")
rss=$(grep -oP 'Maximum resident set size \(kbytes\): \K.*' "$work/time.txt")
python3 - "$wall" "$user" "$sys" "$rss" "$nfiles" "$bytes" <<'PY'
import sys
wall, user, sys_, rss, n, b = sys.argv[1:]
parts = [float(x) for x in wall.split(":")]
secs = parts[-1] + (parts[-2] * 60 if len(parts) > 1 else 0) + (parts[-3] * 3600 if len(parts) > 2 else 0)
n, b = int(n), int(b)
print(f"files: {n}  bytes: {b/1e6:.1f} MB  wall: {secs:.1f} s")
print(f"files/s: {n/secs:.0f}  MB/s: {b/1e6/secs:.1f}  client CPU: {float(user)+float(sys_):.1f} s (user {user}, sys {sys_})  peak RSS: {int(rss)/1024:.1f} MB")
PY
cat "$work/summary.txt"
