#!/usr/bin/env bash
# Sweep benchmark (not a test; CI does not run it).
# Builds a PostgreSQL database with Synapse's media tables and ROWS local media, of which AGED are
# aged out and present on disk (1-8 KB files, uploaded first with `upload`), then times one `sweep`
# and prints wall time, S3 requests (one HEAD per file examined) and peak RSS.
#
# usage: scripts/bench-sweep.sh [--rows 1000000] [--aged 100000] [--concurrency 16]
set -euo pipefail
cd "$(dirname "$0")/.."
rows=1000000 aged=100000 concurrency=16
while (($#)); do
  case "$1" in
    --rows) rows=$2; shift 2 ;;
    --aged) aged=$2; shift 2 ;;
    --concurrency) concurrency=$2; shift 2 ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
. scripts/lib.sh
build_release
work=$(mktemp -d /var/tmp/sso-sweep.XXXXXX)
s3root=$(mktemp -d /dev/shm/sso-sweep-s3.XXXXXX)
db="sso_bench_$$"
psql_() { psql -X -q -h 127.0.0.1 -U postgres "$@"; }
trap 'kill $s3pid 2>/dev/null; rm -rf "$work" "$s3root"; psql_ -d postgres -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1' EXIT
start_s3s "$s3root" bench bench benchsecret "$work/s3s.log"

echo "==> Database $db: $rows local media, $aged aged"
psql_ -d postgres -c "CREATE DATABASE $db"
psql_ -d "$db" -f tests/fixtures/synapse_media_schema.sql
t0=$(date +%s)
psql_ -d "$db" -c "
  INSERT INTO local_media_repository (media_id, media_type, media_length, created_ts, upload_name, user_id, last_access_ts)
  SELECT substr(md5(i::text), 1, 24), 'image/png', 4096, (extract(epoch from now()) * 1000)::bigint - 400 * 86400000::bigint, 'x.png', '@u:example.com',
         CASE WHEN i <= $aged THEN (extract(epoch from now()) * 1000)::bigint - 60 * 86400000::bigint
              ELSE (extract(epoch from now()) * 1000)::bigint - 86400000::bigint END
  FROM generate_series(1, $rows) AS i;
  ANALYZE local_media_repository;"
echo "    rows inserted in $(( $(date +%s) - t0 )) s"

echo "==> Writing $aged files and uploading them"
python3 - "$work/media" "$aged" <<'PY'
import hashlib, os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(1)
pool = os.urandom(1 << 20)
for i in range(1, n + 1):
    mid = hashlib.md5(str(i).encode()).hexdigest()[:24]
    d = os.path.join(root, "local_content", mid[:2], mid[2:4])
    os.makedirs(d, exist_ok=True)
    size = rng.randint(1024, 8192)
    off = rng.randrange(0, len(pool) - size)
    with open(os.path.join(d, mid[4:]), "wb") as f:
        f.write(pool[off:off + size])
PY
cat >"$work/config.yaml" <<YAML
media_store_path: $work/media
state_dir: $work/state
s3:
  bucket: bench
  endpoint_url: http://127.0.0.1:$port
  access_key_id: bench
  secret_access_key: benchsecret
upload:
  concurrency: 16
database:
  host: 127.0.0.1
  user: postgres
  database: $db
  sslmode: disable
sweep:
  keep_local_for: 30d
  confirm_synapse_reads_from_bucket: true
  concurrency: $concurrency
YAML
"$bin" --config "$work/config.yaml" upload --no-progress 2>/dev/null

echo "==> sweep"
/usr/bin/time -v -o "$work/time.txt" "$bin" --config "$work/config.yaml" sweep >"$work/sweep.out" 2>"$work/sweep.err" \
  || { tail -5 "$work/sweep.err" >&2; exit 1; }
tail -1 "$work/sweep.out"
deleted=$(grep -c '^deleted ' "$work/sweep.out" || true)
left=$(find "$work/media/local_content" -type f | wc -l)
wall=$(grep -oP 'Elapsed \(wall clock\) time.*: \K.*' "$work/time.txt")
rss=$(grep -oP 'Maximum resident set size \(kbytes\): \K.*' "$work/time.txt")
cpu=$(awk -F': ' '/User time|System time/ {s += $2} END {print s}' "$work/time.txt")
echo "rows $rows, aged files $aged: wall $wall, client CPU ${cpu}s, peak RSS $((rss / 1024)) MB, S3 requests $aged HEAD + 0 other, deleted $deleted, files left $left"
