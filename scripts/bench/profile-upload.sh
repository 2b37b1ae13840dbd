#!/usr/bin/env bash
# Instruction profile of the `upload` backfill (not a test; CI does not run it).
# Runs `upload` under valgrind's callgrind on a seeded store into an empty bucket of s3s-fs
# (loopback, data on tmpfs) and prints instructions per file: total, and the heaviest functions
# (inclusive). Instruction counts do not depend on what else the machine is doing, so before/after
# comparisons hold on a busy machine where wall-clock figures do not.
# Also runs it once natively under /usr/bin/time -v for the peak RSS.
#
# usage: scripts/bench/profile-upload.sh [--files N] [--scale F] [--concurrency C] [--keep DIR]
#   --keep DIR  leave callgrind.out (for callgrind_annotate) in DIR
# Note: valgrind hides CPU features it cannot emulate (SHA-NI, for one), so hashing that uses them
# natively counts more instructions here than it costs on the machine.
set -euo pipefail
cd "$(dirname "$0")/../.."
files=1000 scale=0.2 concurrency=16 keep=
while (($#)); do
  case "$1" in
    --files) files=$2; shift 2 ;;
    --scale) scale=$2; shift 2 ;;
    --concurrency) concurrency=$2; shift 2 ;;
    --keep) keep=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind; }
. scripts/lib.sh
build_release
work=$(mktemp -d /var/tmp/sso-prof.XXXXXX)
s3root=$(mktemp -d /dev/shm/sso-prof-s3.XXXXXX)
trap 'kill $s3pid 2>/dev/null; rm -rf "$work" "$s3root"' EXIT
start_s3s "$s3root" warmup bench benchsecret "$work/s3s.log"
python3 scripts/bench/gen_store.py "$work/media" --files "$files" --scale "$scale" >&2
nfiles=$(find "$work/media" -type f | wc -l)

config() { # bucket
  mkdir -p "$s3root/$1"
  (umask 077 && cat >"$work/$1.yaml") <<YAML
media_store_path: $work/media
state_dir: $work/state-$1
s3: {bucket: $1, endpoint_url: "http://127.0.0.1:$port", access_key_id: bench, secret_access_key: benchsecret}
upload: {concurrency: $concurrency}
YAML
}

config prof-native
/usr/bin/time -v -o "$work/time.txt" "$bin" --config "$work/prof-native.yaml" upload --no-progress >/dev/null 2>"$work/native.log"
rss=$(grep -oP 'Maximum resident set size \(kbytes\): \K.*' "$work/time.txt")
cpu=$(awk -F': ' '/User time|System time/ {s += $2} END {print s}' "$work/time.txt")

config prof-cg
valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out" -q \
  "$bin" --config "$work/prof-cg.yaml" upload --no-progress >/dev/null 2>"$work/cg.log"
callgrind_annotate --inclusive=yes "$work/callgrind.out" >"$work/annotate.txt" 2>/dev/null
total=$(awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}' "$work/annotate.txt")
echo "files $nfiles, $(du -sm "$work/media" | cut -f1) MB; concurrency $concurrency"
echo "native: peak RSS $((rss / 1024)) MB, CPU ${cpu} s"
echo "callgrind: $total instructions, $((total / nfiles)) per file"
echo "heaviest (inclusive, instructions per file):"
awk -v n="$nfiles" '/^ *[0-9,]+ \(/ { x = $1; gsub(",", "", x); $1 = ""; $2 = ""; sub(/^ *[^:]*:/, ""); sub(/ \[.*\]$/, ""); printf "%12d %s\n", x / n, substr($0, 1, 140) }' "$work/annotate.txt" |
  head -"${SSO_PROF_TOP:-40}" || true
if [[ -n "$keep" ]]; then mkdir -p "$keep" && cp "$work/callgrind.out" "$keep/"; fi
