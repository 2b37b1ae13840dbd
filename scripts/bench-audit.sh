#!/usr/bin/env bash
# Audit benchmark (not a test; CI does not run it).
# Builds a PostgreSQL database with Synapse's media tables: ROWS local media, each with 4 thumbnail
# rows (5 files a media), and a matching bucket listing (every 100th media missing: lost; plus
# ORPHANS objects without a row), then times one `audit --json` and prints wall time, peak RSS and
# the counts found. The listing comes from scripts/bench/list_server.py (s3s-fs lists by walking
# its whole directory for each page of 1,000 keys, which would take hours at this size).
#
# usage: scripts/bench-audit.sh [--rows 1000000] [--orphans 10000]
set -euo pipefail
cd "$(dirname "$0")/.."
rows=1000000 orphans=10000
while (($#)); do
  case "$1" in
    --rows) rows=$2; shift 2 ;;
    --orphans) orphans=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
. scripts/lib.sh
build_release
work=$(mktemp -d /var/tmp/sso-audit.XXXXXX)
db="sso_bench_audit_$$"
psql_() { psql -X -q -h 127.0.0.1 -U postgres "$@"; }
trap 'kill $lspid 2>/dev/null; rm -rf "$work"; psql_ -d postgres -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1' EXIT

echo "==> Database $db: $rows local media with 4 thumbnails each"
psql_ -d postgres -c "CREATE DATABASE $db"
psql_ -d "$db" -f tests/fixtures/synapse_media_schema.sql
t0=$(date +%s)
psql_ -d "$db" -c "
  INSERT INTO local_media_repository (media_id, media_type, media_length, created_ts, upload_name, user_id, last_access_ts)
  SELECT substr(md5(i::text), 1, 24), 'image/jpeg', 4096, 0, 'x.jpg', '@u:example.com', 0
  FROM generate_series(1, $rows) AS i;
  INSERT INTO local_media_repository_thumbnails (media_id, thumbnail_width, thumbnail_height, thumbnail_type, thumbnail_method, thumbnail_length)
  SELECT substr(md5(i::text), 1, 24), t.w, t.h, 'image/jpeg', t.m, 4096
  FROM generate_series(1, $rows) AS i,
       (VALUES (32, 32, 'crop'), (96, 96, 'crop'), (320, 240, 'scale'), (640, 480, 'scale')) AS t(w, h, m);
  ANALYZE;"
echo "    rows inserted in $(( $(date +%s) - t0 )) s"

port=$(free_port)
python3 scripts/bench/list_server.py "$port" "$rows" "$orphans" "media/" >"$work/list.log" 2>&1 &
lspid=$!
for _ in $(seq 1 600); do grep -q "keys on" "$work/list.log" 2>/dev/null && break; sleep 0.5; done
cat "$work/list.log"
mkdir -p "$work/media/local_content"
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
YAML

echo "==> audit"
set +e
AWS_EC2_METADATA_DISABLED=true /usr/bin/time -v "$bin" --config "$work/config.yaml" audit --json --examples 3 \
  >"$work/report.json" 2>"$work/time.log"
rc=$?
set -e
python3 - "$work/report.json" "$work/time.log" "$rc" <<'PY'
import json, re, sys
r = json.load(open(sys.argv[1]))
t = open(sys.argv[2]).read()
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t).group(1))
wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", t).group(1)
cpu = float(re.search(r"User time \(seconds\): (\S+)", t).group(1)) + float(re.search(r"System time \(seconds\): (\S+)", t).group(1))
print(f"database files {r['database_files']:,}  objects {r['objects']:,}  (exit status {sys.argv[3]}: 3 = lost media found)")
print(f"lost {r['lost']['count']:,}  orphans {r['orphans']['count']:,}  not uploaded {r['not_uploaded']['count']:,}  mismatched {r['mismatched']['count']:,}")
print(f"audit: {r['seconds']:.1f} s (wall {wall}), client CPU {cpu:.1f} s, peak RSS {rss / 1024:.0f} MB")
PY
