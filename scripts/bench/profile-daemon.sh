#!/usr/bin/env bash
# Instruction profile of the daemon (`run`) per file written (not a test; CI does not run it).
# Starts `run` under valgrind's callgrind on an empty store (s3s-fs on loopback, data on tmpfs),
# writes FILES files Synapse-style (each in a new AB/CD directory) at RATE files/s, waits until all
# are in the bucket, stops the daemon with SIGTERM and prints instructions per file: total and the
# heaviest functions (inclusive). The daemon's startup (before the first file) is included once.
#
# usage: scripts/bench/profile-daemon.sh [--files 200] [--rate 20] [--size 100000] [--keep DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
files=200 rate=20 size=100000 keep=
while (($#)); do
  case "$1" in
    --files) files=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --keep) keep=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind; }
. scripts/lib.sh
build_release
work=$(mktemp -d /var/tmp/sso-profd.XXXXXX)
s3root=$(mktemp -d /dev/shm/sso-profd-s3.XXXXXX)
vpid=
trap '[[ -n "$vpid" ]] && kill $vpid 2>/dev/null; kill $s3pid 2>/dev/null; rm -rf "$work" "$s3root"' EXIT
start_s3s "$s3root" bench bench benchsecret "$work/s3s.log"
mkdir -p "$work/media"
(umask 077 && cat >"$work/config.yaml") <<YAML
media_store_path: $work/media
state_dir: $work/state
s3: {bucket: bench, endpoint_url: "http://127.0.0.1:$port", access_key_id: bench, secret_access_key: benchsecret}
YAML
valgrind --tool=callgrind --callgrind-out-file="$work/callgrind.out" -q \
  "$bin" --config "$work/config.yaml" run 2>"$work/daemon.log" &
vpid=$!
for _ in $(seq 1 600); do grep -q 'Watching the media store' "$work/daemon.log" && break; sleep 0.1; done
grep -q 'Watching the media store' "$work/daemon.log" || { cat "$work/daemon.log" >&2; exit 1; }
python3 - "$work/media" "$s3root/bench" "$files" "$rate" "$size" <<'PY'
import os, random, string, sys, time
media, bucket, n, rate, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
rng = random.Random(7)
payload = os.urandom(size)
rels = []
t0 = time.monotonic()
for i in range(n):
    while time.monotonic() < t0 + i / rate:
        time.sleep(0.001)
    mid = "".join(rng.choice(string.ascii_letters) for _ in range(24))
    rel = f"local_content/{mid[:2]}/{mid[2:4]}/{mid[4:]}"
    os.makedirs(os.path.dirname(os.path.join(media, rel)), exist_ok=True)
    with open(os.path.join(media, rel), "wb") as f:
        f.write(payload)
    rels.append(rel)
deadline = time.monotonic() + 300
while time.monotonic() < deadline and not all(os.path.exists(os.path.join(bucket, r)) for r in rels):
    time.sleep(0.2)
missing = sum(not os.path.exists(os.path.join(bucket, r)) for r in rels)
print(f"{n - missing}/{n} files in the bucket", file=sys.stderr)
PY
# Let the new-directory rescans (up to 5 s after the last directory) run before stopping.
sleep 6
kill -TERM "$vpid"
wait "$vpid" || true
vpid=
callgrind_annotate --inclusive=yes "$work/callgrind.out" >"$work/annotate.txt" 2>/dev/null
total=$(awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}' "$work/annotate.txt")
echo "files $files at $rate/s, $size B each"
echo "callgrind: $total instructions, $((total / files)) per file"
echo "heaviest (inclusive, instructions per file):"
awk -v n="$files" '/^ *[0-9,]+ \(/ { x = $1; gsub(",", "", x); $1 = ""; $2 = ""; sub(/^ *[^:]*:/, ""); sub(/ \[.*\]$/, ""); printf "%12d %s\n", x / n, substr($0, 1, 140) }' "$work/annotate.txt" |
  head -"${SSO_PROF_TOP:-40}" || true
if [[ -n "$keep" ]]; then mkdir -p "$keep" && cp "$work/callgrind.out" "$keep/"; fi
