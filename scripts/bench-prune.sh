#!/usr/bin/env bash
# Prune benchmark (not a test; CI does not run it): the incremental and the full path of the prune
# job at ROWS media (issue 18).
# A PostgreSQL database with ROWS local media rows and 4 thumbnail rows each (5 files a media), of
# which every 1,000th media was then deleted (rows gone, as Synapse deletes); a state database with
# an upload record for every file (examples/bench_state.rs: what `upload` leaves); a bucket listing
# of those files (scripts/bench/list_server.py; every 100th media missing, as in bench-audit.sh),
# which also takes the DELETEs and counts requests. Each path runs twice on its own copy of the
# state, `prune.grace` (1 s) apart: the first run records the sightings, the second deletes. Prints
# wall time, client CPU, peak RSS, PostgreSQL queries and S3 requests (counted by the server) of
# each run.
#
# usage: scripts/bench-prune.sh [--rows 1000000]   (SSO_BIN=… SSO_FILL=… to use given builds)
set -euo pipefail
cd "$(dirname "$0")/.."
rows=1000000
while (($#)); do
  case "$1" in
    --rows) rows=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
. scripts/lib.sh
build_release
# SSO_FILL: a built examples/bench_state (with SSO_BIN, to skip the release build).
fill=${SSO_FILL:-}
if [[ -z "$fill" ]]; then
  cargo build --release --locked -q --example bench_state
  fill="$CARGO_TARGET_DIR/release/examples/bench_state"
fi
work=$(mktemp -d /var/tmp/sso-prune.XXXXXX)
db="sso_bench_prune_$$"
psql_() { psql -X -q -h 127.0.0.1 -U postgres "$@"; }
trap 'kill $lspid 2>/dev/null; rm -rf "$work"; psql_ -d postgres -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1' EXIT

echo "==> Database $db: $rows local media with 4 thumbnails each, every 1,000th deleted"
psql_ -d postgres -c "CREATE DATABASE $db"
psql_ -d "$db" -f tests/fixtures/synapse_media_schema.sql
t0=$(date +%s)
psql_ -d "$db" -c "
  INSERT INTO local_media_repository (media_id, media_type, media_length, created_ts, upload_name, user_id, last_access_ts)
  SELECT substr(md5(i::text), 1, 24), 'image/jpeg', 4096, 0, 'x.jpg', '@u:example.com', 0
  FROM generate_series(1, $rows) AS i WHERE i % 1000 <> 7;
  INSERT INTO local_media_repository_thumbnails (media_id, thumbnail_width, thumbnail_height, thumbnail_type, thumbnail_method, thumbnail_length)
  SELECT substr(md5(i::text), 1, 24), t.w, t.h, 'image/jpeg', t.m, 4096
  FROM generate_series(1, $rows) AS i,
       (VALUES (32, 32, 'crop'), (96, 96, 'crop'), (320, 240, 'scale'), (640, 480, 'scale')) AS t(w, h, m)
  WHERE i % 1000 <> 7;
  ANALYZE;"
echo "    rows inserted in $(( $(date +%s) - t0 )) s"

echo "==> State: a record for every file"
t0=$(date +%s)
"$fill" "$work/state0" "$rows"
echo "    filled in $(( $(date +%s) - t0 )) s"

port=$(free_port)
python3 scripts/bench/list_server.py "$port" "$rows" 0 "media/" >"$work/list.log" 2>&1 &
lspid=$!
for _ in $(seq 1 1200); do grep -q "keys on" "$work/list.log" 2>/dev/null && break; sleep 0.5; done
cat "$work/list.log"
mkdir -p "$work/media/local_content"

run_path() { # incremental|full
  local path=$1
  rm -rf "$work/state"
  cp -a "$work/state0" "$work/state"
  curl -s "http://127.0.0.1:$port/__reset" >/dev/null
  cat >"$work/config.yaml" <<YAML
media_store_path: $work/media
state_dir: $work/state
s3:
  bucket: bench
  prefix: media/
  endpoint_url: http://127.0.0.1:$port
  region_name: us-east-1
  access_key_id: bench
  secret_access_key: benchsecret
database:
  host: 127.0.0.1
  port: 5432
  user: postgres
  database: $db
  sslmode: disable
prune:
  grace: 1s
YAML
  for round in 1 2; do
    local before
    before=$(curl -s "http://127.0.0.1:$port/__requests")
    AWS_EC2_METADATA_DISABLED=true /usr/bin/time -v "$bin" --config "$work/config.yaml" prune "--$path" --json \
      >"$work/report.json" 2>"$work/time.log" || { tail -5 "$work/time.log"; exit 1; }
    local after
    after=$(curl -s "http://127.0.0.1:$port/__requests")
    python3 - "$work/report.json" "$work/time.log" "$path" "$round" "$before" "$after" <<'PY'
import json, re, sys
r = json.load(open(sys.argv[1]))
t = open(sys.argv[2]).read()
before, after = json.loads(sys.argv[5]), json.loads(sys.argv[6])
req = {k: after.get(k, 0) - before.get(k, 0) for k in after}
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1))
wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", t).group(1)
cpu = float(re.search(r"User time \(seconds\): (\S+)", t).group(1)) + float(re.search(r"System time \(seconds\): (\S+)", t).group(1))
print(f"{sys.argv[3]:<11} run {sys.argv[4]}: checked {r['checked']:,}  orphans {r['orphans']:,}  deleted {r['deleted']['count']:,}  "
      f"wall {wall} ({r['seconds']:.1f} s in the run)  client CPU {cpu:.1f} s  peak RSS {rss / 1024:.0f} MB  "
      f"PostgreSQL queries {r['db_queries']:,}  S3 requests {sum(req.values()):,} {dict(req)}")
PY
    sleep 1.1
  done
}
echo "==> incremental path"
run_path incremental
echo "==> full path"
run_path full
