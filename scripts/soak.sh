#!/usr/bin/env bash
# Soak test (not in CI, not in scripts/test.sh): N minutes of Synapse-like writes, reads and
# deletions while the daemon runs with a sweep every 15 s and keep_local_for 20 s, with S3
# (s3s-fs) and PostgreSQL (a private cluster) stopped and restarted several times, one inotify
# queue overflow (the daemon stopped with SIGSTOP while 20,000 files are written into new
# directories) and, as root, one remount of the media store (its own ext4 file system on a loop
# device, unmounted and mounted again). Then the queue is drained and everything is audited
# against the bucket (s3s-fs keeps objects as plain files).
#
#   scripts/soak.sh [--minutes N (30)] [--rate FILES_PER_S (5)] [--keep]
#
# Prints files written, uploaded, lost (must be 0), wrongly deleted (must be 0), the daemon's
# peak RSS and RSS growth; exits non-zero if anything was lost or wrongly deleted.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib.sh
source scripts/lib.sh

minutes=30 rate=5 keep=0
while (($#)); do
  case $1 in
    --minutes) minutes=$2; shift 2 ;;
    --rate) rate=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    *) echo "usage: $0 [--minutes N] [--rate FILES_PER_S] [--keep]" >&2; exit 2 ;;
  esac
done
seconds=$((minutes * 60))
log() { printf '==> [%s] %s\n' "$(date +%T)" "$*" >&2; }

build_release
ensure_s3s
# On disk, not tmpfs: a 30-minute run writes several GB.
work=$(mktemp -d /var/tmp/sso-soak.XXXXXX)
chmod 755 "$work"
mkdir -p "$work/media" "$work/s3/soak"
daemon_pid="" s3pid="" bg_pids=() loopdev=""
# The store on a file system of its own, so that it can be remounted (root and loop devices).
if ((EUID == 0)) && command -v losetup >/dev/null && command -v mkfs.ext4 >/dev/null; then
  truncate -s 16G "$work/media.img" && mkfs.ext4 -q -F "$work/media.img" &&
    loopdev=$(losetup -f --show "$work/media.img") && mount "$loopdev" "$work/media" || loopdev=""
fi
pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n1)
[[ -x "$pgbin/initdb" ]] || { echo "PostgreSQL server binaries not found under /usr/lib/postgresql" >&2; exit 1; }
as_pg() { if ((EUID == 0)); then runuser -u postgres -- "$@"; else "$@"; fi; }
pg_start() { as_pg "$pgbin/pg_ctl" -D "$work/pg/data" -l "$work/pg/log" -w -o "-p $pgport -k $work/pg -c listen_addresses=127.0.0.1" start >/dev/null; }
pg_stop() { as_pg "$pgbin/pg_ctl" -D "$work/pg/data" -m fast -w stop >/dev/null 2>&1 || true; }
s3_start() {
  "$s3s" --host 127.0.0.1 --port "$s3port" --access-key soak-key --secret-key soak-secret "$work/s3" >>"$work/s3s.log" 2>&1 &
  s3pid=$!
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$s3port") 2>/dev/null && return 0; sleep 0.1; done
  echo "s3s-fs did not start; see $work/s3s.log" >&2; return 1
}
s3_stop() { kill "$s3pid" 2>/dev/null || true; wait "$s3pid" 2>/dev/null || true; }
cleanup() {
  for p in "${bg_pids[@]}" $daemon_pid; do kill "$p" 2>/dev/null || true; done
  s3_stop
  [[ -d "$work/pg/data" ]] && pg_stop
  if [[ -n "$loopdev" ]]; then umount "$work/media" 2>/dev/null; losetup -d "$loopdev" 2>/dev/null; fi
  if ((keep)); then log "kept $work"; else rm -rf "$work"; fi
}
trap cleanup EXIT

# --- Services --------------------------------------------------------------------------------
s3port=$(free_port) pgport=$(free_port) mport=$(free_port)
s3_start
mkdir "$work/pg"
((EUID == 0)) && chown postgres: "$work/pg"
as_pg "$pgbin/initdb" -D "$work/pg/data" -U postgres --auth=trust -E UTF8 >/dev/null
pg_start
psql=(psql -X -q -h 127.0.0.1 -p "$pgport" -U postgres)
"${psql[@]}" -d postgres -c "CREATE DATABASE synapse"
"${psql[@]}" -d synapse -f tests/fixtures/synapse_media_schema.sql
log "s3s-fs on :$s3port, PostgreSQL on :$pgport, work dir $work"

cat >"$work/config.yaml" <<EOF
media_store_path: $work/media
state_dir: $work/state
scan_interval: 2m
s3:
  bucket: soak
  endpoint_url: http://127.0.0.1:$s3port
  region_name: us-east-1
  access_key_id: soak-key
  secret_access_key: soak-secret
  connect_timeout: 2s
  request_timeout: 60s
upload:
  settle: 1s
  max_backoff: 5s
  failed_retry_interval: 30s
database:
  host: 127.0.0.1
  port: $pgport
  user: postgres
  database: synapse
  sslmode: disable
  connect_timeout: 3
  statement_timeout: 30s
sweep:
  interval: 15s
  keep_local_for: 20s
  confirm_synapse_reads_from_bucket: true
metrics:
  listen: 127.0.0.1:$mport
EOF
chmod 600 "$work/config.yaml"

# The daemon's default log filter (info, and the noise it leaves out), as an admin runs it.
env -u RUST_LOG "$bin" --config "$work/config.yaml" run 2>"$work/daemon.log" &
daemon_pid=$!

# RSS of the daemon every 2 s (kB).
(while kill -0 "$daemon_pid" 2>/dev/null; do
  awk -v t="$SECONDS" '/^VmRSS/ {print t, $2}' "/proc/$daemon_pid/status" 2>/dev/null || true
  sleep 2
done) >"$work/rss.txt" &
bg_pids+=($!)

# --- Workload and outages --------------------------------------------------------------------
log "Writing for $minutes min at $rate media/s"
python3 scripts/soak/workload.py write --root "$work/media" --bucket-dir "$work/s3/soak" \
  --manifest "$work/manifest.jsonl" --pg-port "$pgport" --seconds "$seconds" --rate "$rate" \
  >"$work/writer.json" &
writer=$!
bg_pids+=($writer)

# An inotify queue overflow: the daemon cannot read events while stopped; 20,000 new files in new
# directories overflow the kernel queue (fs.inotify.max_queued_events, 16,384 by default).
overflow() {
  log "Overflow: daemon stopped (SIGSTOP) while 20,000 files are written into new directories"
  kill -STOP "$daemon_pid"
  python3 scripts/soak/workload.py burst --root "$work/media" --manifest "$work/burst.jsonl" \
    --pg-port "$pgport" --count 20000 >/dev/null
  kill -CONT "$daemon_pid"
  overflows=$((overflows + 1))
}
# A remount of the store's file system: every inotify watch goes with the unmount (the kernel
# says IN_UNMOUNT, which notify does not report). The writer is paused around it; the unmount is
# retried while a file is open (the writer's or the daemon's).
remount() {
  [[ -n "$loopdev" ]] || { log "Remount skipped (needs root, losetup and mkfs.ext4)"; return; }
  log "Remount: unmounting and mounting the store's file system again"
  # The daemon holds files open while it uploads (after the overflow: 20,000 of them): the
  # unmount succeeds between two files once it is idle, so wait for its queue first.
  local tries=0 until_s=$((SECONDS + 180))
  while ((SECONDS < until_s)) && ! "$bin" --config "$work/config.yaml" status --json 2>/dev/null |
    python3 -c 'import json,sys; sys.exit(0 if json.load(sys.stdin)["queued"] < 5 else 1)'; do sleep 1; done
  kill -STOP "$writer"
  until umount "$work/media" 2>/dev/null; do
    tries=$((tries + 1))
    if ((tries > 300)); then log "could not unmount the store (busy)"; kill -CONT "$writer"; return; fi
    kill -CONT "$writer"; sleep 0.1; kill -STOP "$writer"
  done
  mount "$loopdev" "$work/media"
  kill -CONT "$writer"
  remounts=$((remounts + 1))
}

# Outages of 10 s, S3 and PostgreSQL in turn, spread over the run (at least 2 of each); after the
# second an overflow, after the third a remount.
outages=$((minutes / 5 > 4 ? minutes / 5 : 4))
gap=$((seconds / (outages + 1)))
s3_restarts=0 pg_restarts=0 overflows=0 remounts=0
for i in $(seq 1 "$outages"); do
  sleep "$gap"
  kill -0 "$writer" 2>/dev/null || break
  if ((i % 2)); then
    log "Stopping s3s-fs for 10 s"; s3_stop; sleep 10; s3_start; s3_restarts=$((s3_restarts + 1))
  else
    log "Stopping PostgreSQL for 10 s"; pg_stop; sleep 10; pg_start; pg_restarts=$((pg_restarts + 1))
  fi
  ((i == 2)) && overflow
  ((i == 3)) && remount
done
wait "$writer"
written_at=$SECONDS
log "Writer done: $(cat "$work/writer.json")"

# --- Drain, stop, audit ----------------------------------------------------------------------
log "Waiting for the queue to drain"
deadline=$((SECONDS + 600))
until "$bin" --config "$work/config.yaml" status --json 2>/dev/null |
  python3 -c 'import json,sys; s=json.load(sys.stdin); sys.exit(0 if s["queued"] == 0 else 1)'; do
  if ((SECONDS > deadline)); then log "the queue did not drain in 10 minutes"; break; fi
  sleep 2
done
kill -TERM "$daemon_pid"
wait "$daemon_pid" && daemon_exit=0 || daemon_exit=$?
daemon_pid=""

manifests=(--manifest "$work/manifest.jsonl")
[[ -f "$work/burst.jsonl" ]] && manifests+=(--manifest "$work/burst.jsonl")
python3 scripts/soak/workload.py audit --root "$work/media" --bucket-dir "$work/s3/soak" \
  "${manifests[@]}" >"$work/audit.json"

python3 - "$work" "$written_at" "$s3_restarts" "$pg_restarts" "$daemon_exit" "$overflows" "$remounts" <<'EOF'
import json, sys
work, written_at, s3r, pgr, daemon_exit = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
overflows, remounts = int(sys.argv[6]), int(sys.argv[7])
w = json.load(open(f"{work}/writer.json"))
a = json.load(open(f"{work}/audit.json"))
rss = [tuple(map(int, l.split())) for l in open(f"{work}/rss.txt") if l.strip()]
during = [kb for t, kb in rss if t <= written_at] or [kb for _, kb in rss]
# Growth: from the end of the first fifth of the run (after start-up and the first scan) to the end.
base = during[len(during) // 5] if during else 0
mib = lambda kb: kb / 1024
sweeps = sum("Sweep finished." in l for l in open(f"{work}/daemon.log"))
lines = open(f"{work}/daemon.log").read().splitlines()
errors = [l.strip() for l in lines if " ERROR " in l]
warns = sum(" WARN " in l for l in lines)
seen_overflow = sum("inotify queue overflowed" in l for l in lines)
seen_remount = sum("remounted or a file system mounted over it" in l for l in lines)
print(f"media written:     {w['written']} ({w['files']} files, {w['bytes'] / 1e9:.2f} GB); deleted by 'Synapse': {w['deleted_media']} media")
print(f"reads:             {w['reads']} ({w['reads_from_bucket']} from the bucket after the sweep), failed {w['read_errors']}")
print(f"write-backs:       {w['write_backs']} complete, {w['write_backs_cut']} cut short (truncated local copies to heal)")
print(f"local files:       {a['local_changed']} differ from what was written (must be 0: bad copies healed)")
print(f"files to audit:    {a['files']}")
print(f"uploaded:          {a['in_bucket']} in the bucket byte-identical ({a['swept']} of them swept locally)")
print(f"lost:              {a['lost']} (must be 0)")
print(f"wrongly deleted:   {a['wrongly_deleted']} (must be 0)")
if a["examples"]:
    print(f"  e.g. {a['examples']}")
print(f"outages:           s3s-fs {s3r}, PostgreSQL {pgr}; sweeps finished: {sweeps}")
print(f"blinding:          {overflows} overflow(s) injected, {seen_overflow} noticed; {remounts} remount(s), {seen_remount} noticed")
print(f"log lines:         {len(lines)} in all, {warns} WARN, {len(errors)} ERROR")
print(f"daemon RSS:        peak {mib(max(during, default=0)):.1f} MiB, growth {mib(during[-1] - base) if during else 0:+.1f} MiB (from {mib(base):.1f} MiB)")
print(f"daemon:            exit {daemon_exit}, {len(errors)} ERROR log lines (expected: each healed bad copy, and PostgreSQL down during a sweep)")
for l in errors[:3]:
    print(f"  {l[:200]}")
ok = (a["lost"] == 0 and a["wrongly_deleted"] == 0 and w["read_errors"] == 0 and a["local_changed"] == 0
      and daemon_exit == 0 and seen_overflow >= min(overflows, 1) and seen_remount >= min(remounts, 1))
print("RESULT:", "ok" if ok else "FAILED")
sys.exit(0 if ok else 1)
EOF
