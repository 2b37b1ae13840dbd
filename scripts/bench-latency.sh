#!/usr/bin/env bash
# Latency benchmark of the daemon (not a test; CI does not run it).
# For each rate: starts s3s-fs (data on tmpfs) and `synapse-s3-offload run` on an empty media store,
# waits until the watches are in place, writes files Synapse-style (makedirs + open/write/close,
# each in a new AB/CD directory) at that fixed rate, and measures close → object visible in the
# bucket. Each rate gets a fresh daemon, store and bucket. Prints per rate: p50/p99/max, the
# daemon's CPU seconds (and share of one core) and RSS (now and peak), then one table of all rates.
#
# usage: scripts/bench-latency.sh [--rates 10,100,500] [--seconds 60] [--size BYTES] [--hold D]
#   (--rate N is the same as --rates N; --hold sets upload.hold_after_close, default: ours, 1s)
set -euo pipefail
cd "$(dirname "$0")/.."
rates=10,100,500 seconds=60 size=100000 hold=
while (($#)); do
  case "$1" in
    --rates | --rate) rates=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    --hold) hold=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
. scripts/lib.sh
build_release
work=$(mktemp -d /var/tmp/sso-lat.XXXXXX)
s3root=$(mktemp -d /dev/shm/sso-lat-s3.XXXXXX)
dpid=
cleanup() {
  [[ -n "$dpid" ]] && kill "$dpid" 2>/dev/null && wait "$dpid" 2>/dev/null
  kill "$s3pid" 2>/dev/null
  rm -rf "$work" "$s3root"
}
trap cleanup EXIT
start_s3s "$s3root" warmup bench benchsecret "$work/s3s.log"
results="$work/results.tsv"

IFS=, read -ra rate_list <<<"$rates"
for rate in "${rate_list[@]}"; do
  run="$work/rate-$rate" bucket="lat-$rate"
  mkdir -p "$run/media" "$s3root/$bucket"
  cat >"$run/config.yaml" <<YAML
media_store_path: $run/media
state_dir: $run/state
s3:
  bucket: $bucket
  endpoint_url: http://127.0.0.1:$port
  access_key_id: bench
  secret_access_key: benchsecret
YAML
  [[ -n "$hold" ]] && printf 'upload:\n  hold_after_close: %s\n' "$hold" >>"$run/config.yaml"
  "$bin" --config "$run/config.yaml" run 2>"$run/daemon.log" &
  dpid=$!
  # Files written before the watch is in place would be found by the startup scan instead.
  for _ in $(seq 1 300); do grep -q 'Watching the media store' "$run/daemon.log" && break; sleep 0.1; done
  grep -q 'Watching the media store' "$run/daemon.log" || { cat "$run/daemon.log" >&2; exit 1; }
  echo "==> $rate files/s for $seconds s"
  python3 - "$run/media" "$s3root/$bucket" "$rate" "$seconds" "$size" "$dpid" >>"$results" <<'PY'
import os, random, string, sys, time
media, bucket, rate, seconds, size, pid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
tick = os.sysconf("SC_CLK_TCK")
def cpu():
    f = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tick
def rss(field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
rng = random.Random(7)
payload = os.urandom(size)
pending, lat = {}, []
cpu0, t0 = cpu(), time.monotonic()
n = rate * seconds
def poll():
    now = time.monotonic()
    for rel, t in list(pending.items()):
        if os.path.exists(os.path.join(bucket, rel)):
            lat.append(now - t); del pending[rel]
for i in range(n):
    due = t0 + i / rate
    while time.monotonic() < due:
        poll(); time.sleep(0.0005)
    mid = "".join(rng.choice(string.ascii_letters) for _ in range(24))
    rel = f"local_content/{mid[:2]}/{mid[2:4]}/{mid[4:]}"
    p = os.path.join(media, rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
        f.write(payload)
    pending[rel] = time.monotonic()
end = time.monotonic() + 30
while pending and time.monotonic() < end:
    poll(); time.sleep(0.0005)
wall = time.monotonic() - t0
used = cpu() - cpu0
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")
mx = lat[-1] * 1000 if lat else float("nan")
print(f"rate {rate}/s for {seconds}s, {size} B files: {len(lat)}/{n} visible, {len(pending)} missing", file=sys.stderr)
print(f"  close→visible p50 {q(0.50):.1f} ms  p99 {q(0.99):.1f} ms  max {mx:.1f} ms", file=sys.stderr)
print(f"  daemon CPU {used:.1f} s over {wall:.0f} s ({100 * used / wall:.1f} % of one core), RSS {rss('VmRSS'):.1f} MB, peak {rss('VmHWM'):.1f} MB", file=sys.stderr)
print(f"{rate}\t{n}\t{len(lat)}\t{q(0.5):.1f}\t{q(0.99):.1f}\t{mx:.1f}\t{used:.1f}\t{100 * used / wall:.1f}\t{rss('VmRSS'):.1f}\t{rss('VmHWM'):.1f}")
PY
  kill "$dpid"
  wait "$dpid" 2>/dev/null || true
  dpid=
  rm -rf "$run" "${s3root:?}/$bucket"
done

echo
printf '%-8s %7s %8s %8s %8s %9s %8s %7s %7s %8s\n' rate/s files visible 'p50 ms' 'p99 ms' 'max ms' 'CPU s' 'CPU %' 'RSS MB' 'peak MB'
while IFS=$'\t' read -r r n v p50 p99 mx cpu pct rss hwm; do
  printf '%-8s %7s %8s %8s %8s %9s %8s %7s %7s %8s\n' "$r" "$n" "$v" "$p50" "$p99" "$mx" "$cpu" "$pct" "$rss" "$hwm"
done <"$results"
