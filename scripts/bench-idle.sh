#!/usr/bin/env bash
# Idle cost of the daemon (not a test; CI does not run it).
# Builds a Synapse-layout store of DIRS directories (local_content/AB/CD, one
# local_thumbnails/AB/CD/REST directory per local media, the same under remote_content/ORIGIN and
# remote_thumbnail/ORIGIN; one small original and one thumbnail per media), uploads it once with
# `upload` so every file is recorded, then starts `synapse-s3-offload run` and measures:
# - time until the watches are registered (log line "Watching the media store.", dirs=N);
# - time until the startup scan is done: the first "Scan finished." with watched=true (the daemon
#   scans at once and again once the watch covers the store; that scan ends the startup);
# - CPU seconds and RSS while idle for SECONDS with nothing happening in the store.
# One inotify watch per directory: fs.inotify.max_user_watches is raised (sysctl) when it is too
# low for DIRS plus what other processes of this user may hold.
#
# usage: scripts/bench-idle.sh [--dirs 70000] [--seconds 60]
set -euo pipefail
cd "$(dirname "$0")/.."
dirs=70000 seconds=60
while (($#)); do
  case "$1" in
    --dirs) dirs=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
. scripts/lib.sh
build_release

need=$((dirs * 2 + 100000))
have=$(cat /proc/sys/fs/inotify/max_user_watches)
if ((have < need)); then
  echo "NOTE: fs.inotify.max_user_watches is $have; raising it to 1048576 for this benchmark (sysctl -w, not persisted)" >&2
  sysctl -qw fs.inotify.max_user_watches=1048576
fi

work=$(mktemp -d /var/tmp/sso-idle.XXXXXX)
# Small objects only (~0.6 GB with 70,000 directories): tmpfs keeps the preparing upload quick.
s3root=$(mktemp -d /dev/shm/sso-idle-s3.XXXXXX)
trap 'kill $s3pid 2>/dev/null; rm -rf "$work" "$s3root"' EXIT
start_s3s "$s3root" bench bench benchsecret "$work/s3s.log"

echo "==> A store of $dirs directories"
python3 - "$work/media" "$dirs" <<'PY'
import os, random, string, sys
root, want = sys.argv[1], int(sys.argv[2])
rng = random.Random(70)
made = set()
def mkdirs(rel):
    # Counts every directory level below the store root, as inotify needs one watch for each.
    parts = rel.split("/")
    for i in range(1, len(parts) + 1):
        made.add("/".join(parts[:i]))
    os.makedirs(os.path.join(root, rel), exist_ok=True)
def put(rel, size):
    with open(os.path.join(root, rel), "wb") as f:
        f.write(rng.randbytes(size))
origins = ["matrix.org", "example.com", "chat.mozilla.org", "kde.org:8448"]
media = files = 0
while len(made) < want:
    mid = "".join(rng.choice(string.ascii_letters) for _ in range(24))
    a, b, rest = mid[:2], mid[2:4], mid[4:]
    if rng.random() < 0.3:
        o = rng.choice(origins)
        content, thumbs = f"remote_content/{o}/{a}/{b}", f"remote_thumbnail/{o}/{a}/{b}/{rest}"
    else:
        content, thumbs = f"local_content/{a}/{b}", f"local_thumbnails/{a}/{b}/{rest}"
    mkdirs(content); mkdirs(thumbs)
    put(f"{content}/{rest}", rng.randint(200, 2000))
    put(f"{thumbs}/32-32-image-jpeg-crop", rng.randint(100, 500))
    media += 1; files += 2
print(f"    {len(made)} directories, {media} media, {files} files")
PY
cat >"$work/config.yaml" <<YAML
media_store_path: $work/media
state_dir: $work/state
s3:
  bucket: bench
  endpoint_url: http://127.0.0.1:$port
  access_key_id: bench
  secret_access_key: benchsecret
YAML
echo "==> upload (so the daemon finds everything recorded)"
"$bin" --config "$work/config.yaml" upload --no-progress 2>"$work/upload.log" | tail -1
sync

echo "==> run: startup, then $seconds s idle"
python3 - "$bin" "$work/config.yaml" "$seconds" <<'PY'
import os, subprocess, sys, threading, time
binary, config, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3])
tick = os.sysconf("SC_CLK_TCK")
t0 = time.monotonic()
p = subprocess.Popen([binary, "--config", config, "run"], stderr=subprocess.PIPE, text=True)
def cpu():
    f = open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / tick
def mem(field):
    for line in open(f"/proc/{p.pid}/status"):
        if line.startswith(field):
            return int(line.split()[1]) / 1024
seen = {"watch": None, "scans": [], "lines": []}
cond = threading.Condition()
def reader():
    # Stamped on arrival: the daemon writes each log line as it happens.
    for line in p.stderr:
        now = time.monotonic() - t0
        with cond:
            seen["lines"].append(line.rstrip())
            if "Watching the media store" in line:
                seen["watch"] = now
            elif "Scan finished" in line and "watched=true" in line:
                seen["scans"].append(now)
            cond.notify_all()
threading.Thread(target=reader, daemon=True).start()
def ready():
    return seen["watch"] is not None and bool(seen["scans"])
with cond:
    if not cond.wait_for(ready, timeout=600):
        p.kill()
        sys.exit("the daemon did not finish its startup scan within 600 s:\n" + "\n".join(seen["lines"][-20:]))
    watch, scan = seen["watch"], seen["scans"][0]
startup_cpu = cpu()
time.sleep(1)  # let the last startup work (commits, log lines) drain before measuring idle
c0, i0 = cpu(), time.monotonic()
time.sleep(seconds)
idle_cpu, idle_wall = cpu() - c0, time.monotonic() - i0
rss, hwm = mem("VmRSS"), mem("VmHWM")
p.terminate()
p.wait(timeout=60)
dirs = next((l.split("dirs=")[1].split()[0] for l in seen["lines"] if "dirs=" in l), "?")
print(f"watches registered after {watch:.1f} s ({dirs} directories), startup scan done after {scan:.1f} s, startup CPU {startup_cpu:.1f} s")
print(f"idle {idle_wall:.0f} s: daemon CPU {idle_cpu:.2f} s ({100 * idle_cpu / idle_wall:.2f} % of one core), RSS {rss:.1f} MB, peak {hwm:.1f} MB")
PY
