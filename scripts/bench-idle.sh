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
# Scale (issue 20): `--files N` builds the store up to N files instead (THUMBS thumbnails per media,
# `--thumbs`, default 1) and prints the `upload` that records them as the backfill's rate.
# `--backlog N` then, after the idle measurement, stops the S3 server (a long outage), writes N new
# files (same sizes) while the daemon runs, waits until all are queued (the queue-depth metric),
# starts the server again on the same port and data, and times the drain to an empty queue: its
# files/s against the backfill's.
#
# `--server seaweedfs` (or any server of scripts/servers.sh) instead of s3s-fs: SeaweedFS keeps
# objects in volume files, not a file (and two sidecars) per object, so a million objects fit.
#
# usage: scripts/bench-idle.sh [--dirs 70000 | --files N [--thumbs 1]] [--seconds 60] [--backlog 0]
#                              [--server s3s-fs]
set -euo pipefail
cd "$(dirname "$0")/.."
dirs=70000 seconds=60 files=0 thumbs=1 backlog=0 server=s3s-fs
while (($#)); do
  case "$1" in
    --dirs) dirs=$2; shift 2 ;;
    --files) files=$2; shift 2 ;;
    --thumbs) thumbs=$2; shift 2 ;;
    --backlog) backlog=$2; shift 2 ;;
    --server) server=$2; shift 2 ;;
    --seconds) seconds=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
. scripts/lib.sh
build_release

# --files: at most one directory per media and its thumbnails, plus the AB/CD levels.
((files > 0)) && dirs=$((files + 200000))
need=$((dirs * 2 + 100000))
have=$(cat /proc/sys/fs/inotify/max_user_watches)
if ((have < need)); then
  want=$((need > 1048576 ? need : 1048576))
  echo "NOTE: fs.inotify.max_user_watches is $have; raising it to $want for this benchmark (sysctl -w, not persisted)" >&2
  sysctl -qw fs.inotify.max_user_watches=$want
fi

work=$(mktemp -d /var/tmp/sso-idle.XXXXXX)
# Small objects only (~0.6 GB with 70,000 directories): tmpfs keeps the preparing upload quick. A
# store of more than 200,000 files keeps the objects on disk (tmpfs has ~3M inodes here, and
# s3s-fs writes two sidecar files per object).
if ((files > 200000)); then dir=$(mktemp -d /var/tmp/sso-idle-s3.XXXXXX)
else dir=$(mktemp -d /dev/shm/sso-idle-s3.XXXXXX); fi
source scripts/servers.sh
trap 'stop "$dir"; rm -rf "$work" "$dir"' EXIT
"start_${server//-/_}"
ensure_venv
py=$cache/venv/bin/python
create_bucket bench
# The outage of --backlog: the server stopped, then started again on the same port and data.
printf 'cd %q; source scripts/lib.sh; source scripts/servers.sh; stop %q\n' "$PWD" "$dir" >"$work/server-stop.sh"
printf 'cd %q; source scripts/lib.sh; source scripts/servers.sh; launch %q %q\n' "$PWD" "$dir" "$port" >"$work/server-start.sh"

# make_store ROOT DIRS FILES THUMBS SEED: media (one original, THUMBS thumbnails) until DIRS
# directories or, with FILES > 0, FILES files.
make_store() {
python3 - "$@" <<'PY'
import os, random, string, sys
root, want, want_files, thumbs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rng = random.Random(int(sys.argv[5]))
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
while (files < want_files) if want_files else (len(made) < want):
    mid = "".join(rng.choice(string.ascii_letters) for _ in range(24))
    a, b, rest = mid[:2], mid[2:4], mid[4:]
    if rng.random() < 0.3:
        o = rng.choice(origins)
        content, thumbs_dir = f"remote_content/{o}/{a}/{b}", f"remote_thumbnail/{o}/{a}/{b}/{rest}"
    else:
        content, thumbs_dir = f"local_content/{a}/{b}", f"local_thumbnails/{a}/{b}/{rest}"
    mkdirs(content); mkdirs(thumbs_dir)
    put(f"{content}/{rest}", rng.randint(200, 2000))
    for w, h in [(32, 32), (96, 96), (320, 240), (640, 480), (800, 600)][:thumbs]:
        put(f"{thumbs_dir}/{w}-{h}-image-jpeg-{'crop' if w < 100 else 'scale'}", rng.randint(100, 500))
    media += 1; files += 1 + thumbs
print(f"    {len(made)} directories, {media} media, {files} files")
PY
}
if ((files > 0)); then echo "==> A store of $files files"; else echo "==> A store of $dirs directories"; fi
make_store "$work/media" "$dirs" "$files" "$thumbs" 70
cat >"$work/config.yaml" <<YAML
media_store_path: $work/media
state_dir: $work/state
s3:
  bucket: bench
  endpoint_url: http://127.0.0.1:$port
  access_key_id: $key
  secret_access_key: $secret
YAML
chmod 600 "$work/config.yaml"
mport=$(free_port)
if ((backlog > 0)); then printf 'metrics:\n  listen: 127.0.0.1:%s\n' "$mport" >>"$work/config.yaml"; fi
echo "==> upload (so the daemon finds everything recorded)"
t0=$(date +%s.%N)
/usr/bin/time -f '%e %U %S %M' -o "$work/upload.time" \
  "$bin" --config "$work/config.yaml" upload --no-progress 2>"$work/upload.log" | tail -1
read -r uwall uuser usys urss <"$work/upload.time"
ufiles=$(find "$work/media" -type f | wc -l)
python3 -c "import sys; w,u,s,r,n=map(float,sys.argv[1:]); print(f'backfill: {n:.0f} files in {w:.1f} s = {n/w:.0f} files/s, client CPU {u+s:.1f} s, peak RSS {r/1024:.0f} MB')" \
  "$uwall" "$uuser" "$usys" "$urss" "$ufiles" | tee "$work/backfill.txt"
sync
if ((backlog > 0)); then
  # The backlog's files: new media of the same sizes, written while S3 is down.
  make_store "$work/backlog" 0 "$backlog" "$thumbs" 71 >/dev/null
  # The same files through `upload` into a bucket that already holds an object: a HEAD before
  # each PUT, as the daemon does for every new file (an upload into an empty prefix skips it).
  echo "==> upload of the backlog's files into a second bucket that is not empty (HEAD + PUT each)"
  "$py" - "http://127.0.0.1:$port" "$key" "$secret" <<'PY'
import sys, boto3
from botocore.config import Config
s3 = boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1",
                  aws_access_key_id=sys.argv[2], aws_secret_access_key=sys.argv[3],
                  config=Config(s3={"addressing_style": "path"}))
s3.create_bucket(Bucket="bench2")
s3.put_object(Bucket="bench2", Key="local_content/00/00/already-here", Body=b"x")
PY
  sed "s#^media_store_path: .*#media_store_path: $work/backlog#; s#^state_dir: .*#state_dir: $work/state2#; s#bucket: bench#bucket: bench2#; /^metrics:/,\$d" \
    "$work/config.yaml" >"$work/config2.yaml"
  /usr/bin/time -f '%e %U %S %M' -o "$work/upload2.time" \
    "$bin" --config "$work/config2.yaml" upload --no-progress 2>"$work/upload2.log" | tail -1
  read -r uwall uuser usys urss <"$work/upload2.time"
  python3 -c "import sys; w,u,s,r,n=map(float,sys.argv[1:]); print(f'backfill, HEAD + PUT: {n:.0f} files in {w:.1f} s = {n/w:.0f} files/s, client CPU {u+s:.1f} s, peak RSS {r/1024:.0f} MB')" \
    "$uwall" "$uuser" "$usys" "$urss" "$backlog" | tee -a "$work/backfill.txt"
fi

echo "==> run: startup, then $seconds s idle"
"$py" - "$bin" "$work/config.yaml" "$seconds" "$backlog" "$port" "$key" "$secret" "$mport" "$work" <<'PY'
import os, shutil, subprocess, sys, threading, time, urllib.request
from concurrent.futures import ThreadPoolExecutor
binary, config, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3])
backlog, s3port, key, secret, mport, work = int(sys.argv[4]), *sys.argv[5:]
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
dirs = next((l.split("dirs=")[1].split()[0] for l in seen["lines"] if "dirs=" in l), "?")
print(f"watches registered after {watch:.1f} s ({dirs} directories), startup scan done after {scan:.1f} s, startup CPU {startup_cpu:.1f} s")
print(f"idle {idle_wall:.0f} s: daemon CPU {idle_cpu:.2f} s ({100 * idle_cpu / idle_wall:.2f} % of one core), RSS {rss:.1f} MB, peak {hwm:.1f} MB")
def depth():
    body = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read().decode()
    return next(int(float(l.split()[-1])) for l in body.splitlines() if l.startswith("synapse_s3_offload_queue_depth"))
def wait_until(cond, deadline, what):
    end = time.monotonic() + deadline
    while not cond():
        if time.monotonic() > end or p.poll() is not None:
            p.kill()
            sys.exit(f"{what}: not within {deadline} s\n" + "\n".join(seen["lines"][-20:]))
        time.sleep(0.2)
if backlog:
    subprocess.run(["bash", os.path.join(work, "server-stop.sh")], check=True)
    t_out = time.monotonic()
    # The backlog arrives as Synapse writes it: moved into the store one top-level folder at a
    # time would be one event per folder; copied file by file, each is closed after writing.
    src = os.path.join(work, "backlog")
    store = os.path.join(work, "media")
    written = 0
    for d, _, fs in os.walk(src):
        rel = os.path.relpath(d, src)
        os.makedirs(os.path.join(store, rel), exist_ok=True)
        for f in fs:
            shutil.copyfile(os.path.join(d, f), os.path.join(store, rel, f))
            written += 1
    t_written = time.monotonic()
    wait_until(lambda: depth() >= written, 1800, f"{written} files queued")
    t_queued = time.monotonic()
    print(f"S3 down: {written} files written in {t_written - t_out:.1f} s, all queued {t_queued - t_written:.1f} s later (queue depth {depth()})")
    c0 = cpu()
    subprocess.run(["bash", os.path.join(work, "server-start.sh")], check=True)
    t_back = time.monotonic()
    # The circuit breaker's probe notices the server first: the first file's upload ends it.
    wait_until(lambda: depth() < written, 600, "the first upload after S3 came back")
    t_first = time.monotonic()
    wait_until(lambda: depth() == 0, 3600, "backlog drained")
    drain, dcpu = time.monotonic() - t_back, cpu() - c0
    print(f"S3 back: the first queued file uploaded {t_first - t_back:.1f} s after the server started; the rest at {(written - 1) / max(time.monotonic() - t_first, 1e-3):.0f} files/s")
    import boto3
    from botocore.config import Config
    s3 = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3port}", region_name="us-east-1",
                      aws_access_key_id=key, aws_secret_access_key=secret,
                      config=Config(s3={"addressing_style": "path"}, max_pool_connections=32))
    def absent(rel):
        try:
            return s3.head_object(Bucket="bench", Key=rel)["ContentLength"] != os.path.getsize(os.path.join(store, rel))
        except Exception:
            return True
    rels = [os.path.relpath(os.path.join(d, f), src) for d, _, fs in os.walk(src) for f in fs]
    with ThreadPoolExecutor(32) as pool:
        missing = sum(pool.map(absent, rels))
    print(f"S3 back: backlog of {written} files drained in {drain:.1f} s = {written / drain:.0f} files/s, daemon CPU {dcpu:.1f} s, objects missing {missing}, RSS peak {mem('VmHWM'):.1f} MB")
    print(open(os.path.join(work, "backfill.txt")).read().strip())
p.terminate()
p.wait(timeout=60)
PY
