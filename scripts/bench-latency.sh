#!/usr/bin/env bash
# Latency benchmark of the daemon (not a test; CI does not run it).
# Starts s3s-fs (data on tmpfs) and `synapse-s3-offload run` on an empty media store, writes files
# Synapse-style (makedirs + open/write/close, each in a new AB/CD directory) at a fixed rate, and
# measures close → object visible in the bucket. Prints p50/p99/max and the daemon's CPU and RSS.
#
# usage: scripts/bench-latency.sh [--rate FILES_PER_S] [--seconds N] [--size BYTES]
set -euo pipefail
cd "$(dirname "$0")/.."
rate=100 seconds=60 size=100000
while (($#)); do
  case "$1" in
    --rate) rate=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    --size) size=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
. scripts/lib.sh
build_release
work=$(mktemp -d /var/tmp/sso-lat.XXXXXX)
s3root=$(mktemp -d /dev/shm/sso-lat-s3.XXXXXX)
mkdir -p "$work/media"
trap 'kill $s3pid 2>/dev/null; rm -rf "$work" "$s3root"' EXIT
start_s3s "$s3root" bench bench benchsecret "$work/s3s.log"
cat >"$work/config.yaml" <<YAML
media_store_path: $work/media
state_dir: $work/state
s3:
  bucket: bench
  endpoint_url: http://127.0.0.1:$port
  access_key_id: bench
  secret_access_key: benchsecret
YAML
"$bin" --config "$work/config.yaml" run 2>"$work/daemon.log" &
dpid=$!
trap 'kill $dpid $s3pid 2>/dev/null; wait $dpid 2>/dev/null; rm -rf "$work" "$s3root"' EXIT
sleep 1
python3 - "$work/media" "$s3root/bench" "$rate" "$seconds" "$size" "$dpid" <<'PY'
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
lat.sort()
q = lambda p: lat[min(len(lat) - 1, int(p * len(lat)))] * 1000
print(f"rate {rate}/s for {seconds}s, {size} B files: {len(lat)}/{n} visible, {len(pending)} missing")
print(f"close→visible p50 {q(0.50):.1f} ms  p99 {q(0.99):.1f} ms  max {lat[-1]*1000:.1f} ms")
print(f"daemon CPU {cpu() - cpu0:.1f} s over {wall:.0f} s ({100 * (cpu() - cpu0) / wall:.1f} %), RSS {rss('VmRSS'):.1f} MB, peak {rss('VmHWM'):.1f} MB")
PY
