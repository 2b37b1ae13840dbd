#!/usr/bin/env bash
# A/B of two builds of synapse-s3-offload on the same `upload` (not a test; CI does not run it):
# one seeded store, one s3s-fs (data on disk), the two binaries alternating for ROUNDS rounds, each
# run into an empty bucket. Prints wall, client CPU (user + sys) and peak RSS per run. Use it to
# measure one optimisation: build before and after, copy each binary aside, compare.
#
# usage: scripts/bench/ab-upload.sh BIN_A BIN_B [--rounds 3] [--files 3000] [--scale 1.0]
set -euo pipefail
cd "$(dirname "$0")/../.."
source scripts/lib.sh

[[ $# -ge 2 ]] || { sed -n 2,7p "$0" >&2; exit 2; }
a=$1 b=$2
shift 2
rounds=3 files=3000 scale=1.0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --rounds) rounds=$2; shift 2 ;;
    --files) files=$2; shift 2 ;;
    --scale) scale=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done

work=$(mktemp -d /var/tmp/sso-ab.XXXXXX)
s3root=$(mktemp -d /var/tmp/sso-ab-s3.XXXXXX)
trap 'kill $s3pid 2>/dev/null; rm -rf "$work" "$s3root"' EXIT
start_s3s "$s3root" warmup bench benchsecret "$work/s3s.log"
loopback_only
python3 scripts/bench/gen_store.py "$work/media" --files "$files" --scale "$scale" >/dev/null
echo "store: $(find "$work/media" -type f | wc -l) files, $(du -sm "$work/media" | cut -f1) MB"

n=0
for _ in $(seq 1 "$rounds"); do
  for bin in "$a" "$b"; do
    n=$((n + 1))
    bucket="bench-ab-$n"
    mkdir -p "$s3root/$bucket"
    cat >"$work/config.yaml" <<YAML
media_store_path: $work/media
state_dir: $work/state-$n
s3: {bucket: $bucket, endpoint_url: "http://127.0.0.1:$port", access_key_id: bench, secret_access_key: benchsecret}
upload: {concurrency: 16}
YAML
    sync
    /usr/bin/time -f "%e %U %S %M" -o "$work/time" "$bin" --config "$work/config.yaml" upload \
      >/dev/null 2>"$work/stderr" || { cat "$work/stderr" >&2; exit 1; }
    read -r wall user sys rss_kb <"$work/time"
    printf '%-40s wall %6.2f s  cpu %6.2f s  rss %4d MB\n' "$bin" "$wall" \
      "$(echo "$user + $sys" | bc)" $((rss_kb / 1024))
    rm -rf "$s3root/$bucket"
  done
done
