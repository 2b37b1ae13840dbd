#!/usr/bin/env bash
# Sweep benchmark (not a test; CI does not run it).
# Builds a PostgreSQL database with Synapse's media tables and ROWS local media, of which AGED are
# aged out and present on disk (1-8 KB files, uploaded first with `upload`), then times one `sweep`
# and prints wall time, S3 requests (one HEAD per file examined) and peak RSS.
# Then the same job for s3_media_upload (synapse-s3-storage-provider): the same files are written
# again (same bytes, so the bucket already holds them, as it does for our sweep) and
# `s3_media_upload update <store> 30d` + `upload --delete` runs on them. With --peer-divisor N it
# runs on an N× smaller copy (ROWS/N rows, AGED/N aged files; the issue allows 10× when the full
# run takes too long) and the comparison is per file.
#
# With --sqlite the database is a SQLite file with Synapse's real schema
# (tests/fixtures/synapse_sqlite_schema.sql), in WAL mode as Synapse keeps it, and the peer run is
# skipped (this compares our two backends: run once with and once without --sqlite).
#
# usage: scripts/bench-sweep.sh [--rows 1000000] [--aged 100000] [--concurrency 16]
#                               [--peer-divisor 1] [--no-peer] [--sqlite]
set -euo pipefail
cd "$(dirname "$0")/.."
rows=1000000 aged=100000 concurrency=16 divisor=1 peer=1 sqlite=0
while (($#)); do
  case "$1" in
    --rows) rows=$2; shift 2 ;;
    --aged) aged=$2; shift 2 ;;
    --concurrency) concurrency=$2; shift 2 ;;
    --peer-divisor) divisor=$2; shift 2 ;;
    --no-peer) peer=0; shift ;;
    --sqlite) sqlite=1 peer=0; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
done
. scripts/lib.sh
build_release
((peer)) && ensure_peer_venv
work=$(mktemp -d /var/tmp/sso-sweep.XXXXXX)
s3root=$(mktemp -d /dev/shm/sso-sweep-s3.XXXXXX)
db="sso_bench_$$" pdb="sso_bench_peer_$$"
psql_() { psql -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -U postgres "$@"; }
trap 'kill $s3pid 2>/dev/null; rm -rf "$work" "$s3root"; for d in $db $pdb; do psql_ -d postgres -c "DROP DATABASE IF EXISTS $d" >/dev/null 2>&1; done' EXIT
start_s3s "$s3root" bench bench benchsecret "$work/s3s.log"

# make_db DB ROWS AGED: Synapse's media tables with ROWS local media; rows 1..AGED were last
# accessed 60 days ago, the others yesterday. media_id = first 24 hex digits of md5(row number).
make_db() {
  local db=$1 rows=$2 aged=$3
  echo "==> Database $db: $rows local media, $aged aged"
  psql_ -d postgres -c "CREATE DATABASE $db"
  psql_ -d "$db" -f tests/fixtures/synapse_media_schema.sql
  local t0
  t0=$(date +%s)
  psql_ -d "$db" -c "
  INSERT INTO local_media_repository (media_id, media_type, media_length, created_ts, upload_name, user_id, last_access_ts)
  SELECT substr(md5(i::text), 1, 24), 'image/png', 4096, (extract(epoch from now()) * 1000)::bigint - 400 * 86400000::bigint, 'x.png', '@u:example.com',
         CASE WHEN i <= $aged THEN (extract(epoch from now()) * 1000)::bigint - 60 * 86400000::bigint
              ELSE (extract(epoch from now()) * 1000)::bigint - 86400000::bigint END
  FROM generate_series(1, $rows) AS i;
  ANALYZE local_media_repository;"
  echo "    rows inserted in $(($(date +%s) - t0)) s"
}

# make_sqlite DB ROWS AGED: the same rows in a SQLite file made from Synapse's schema.
make_sqlite() {
  echo "==> SQLite database $1: $2 local media, $3 aged"
  local t0
  t0=$(date +%s)
  python3 - "$1" "$2" "$3" <<'PY'
import hashlib, sqlite3, sys, time
path, rows, aged = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
c = sqlite3.connect(path)
c.execute("PRAGMA journal_mode = wal")
c.executescript("BEGIN;" + open("tests/fixtures/synapse_sqlite_schema.sql").read() + "COMMIT;")
now = int(time.time() * 1000)
day = 86400000
c.executemany(
    "INSERT INTO local_media_repository (media_id, media_type, media_length, created_ts, upload_name, user_id, last_access_ts) VALUES (?, 'image/png', 4096, ?, 'x.png', '@u:example.com', ?)",
    ((hashlib.md5(str(i).encode()).hexdigest()[:24], now - 400 * day, now - (60 if i <= aged else 1) * day)
     for i in range(1, rows + 1)))
c.commit()
c.execute("ANALYZE")
c.close()
PY
  echo "    rows inserted in $(($(date +%s) - t0)) s"
}

# write_files N: the files of rows 1..N (the aged ones), 1-8 KB each; the same bytes every time.
write_files() {
  python3 - "$work/media" "$1" <<'PY'
import hashlib, os, random, sys
root, n = sys.argv[1], int(sys.argv[2])
rng = random.Random(1)
pool = random.Random(2).randbytes(1 << 20)
for i in range(1, n + 1):
    mid = hashlib.md5(str(i).encode()).hexdigest()[:24]
    d = os.path.join(root, "local_content", mid[:2], mid[2:4])
    os.makedirs(d, exist_ok=True)
    size = rng.randint(1024, 8192)
    off = rng.randrange(0, len(pool) - size)
    with open(os.path.join(d, mid[4:]), "wb") as f:
        f.write(pool[off:off + size])
PY
}

if ((sqlite)); then
  make_sqlite "$work/homeserver.db" "$rows" "$aged"
  database_yaml="database:
  name: sqlite3
  database: $work/homeserver.db"
else
  make_db "$db" "$rows" "$aged"
  database_yaml="database:
  host: 127.0.0.1
  user: postgres
  database: $db
  sslmode: disable"
fi
echo "==> Writing $aged files and uploading them"
write_files "$aged"
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
$database_yaml
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
echo "$( ((sqlite)) && echo SQLite || echo PostgreSQL): rows $rows, aged files $aged: wall $wall, client CPU ${cpu}s, peak RSS $((rss / 1024)) MB, S3 requests $aged HEAD + 0 other, deleted $deleted, files left $left"
ours_wall=$wall

((peer)) || exit 0
prows=$((rows / divisor)) paged=$((aged / divisor))
if ((divisor == 1)); then
  pdb=$db # the sweep changes no row: the same database serves again
else
  make_db "$pdb" "$prows" "$paged"
fi
echo "==> s3_media_upload update + upload --delete on $prows rows, $paged aged files$( ((divisor > 1)) && echo " (a ${divisor}x smaller copy)")"
write_files "$paged"
smu_database_yaml "$work/smu" "$pdb"
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=benchsecret AWS_DEFAULT_REGION=us-east-1
loopback_only
(
  cd "$work/smu"
  /usr/bin/time -v -o "$work/time-smu.txt" bash -c "
    '$venv/bin/s3_media_upload' --no-progress update '$work/media' 30d &&
    '$venv/bin/s3_media_upload' --no-progress upload '$work/media' bench --endpoint-url 'http://127.0.0.1:$port' --delete" \
    >"$work/smu.out" 2>&1
) || { tail -5 "$work/smu.out" >&2; exit 1; }
grep -E '^(Uploaded|Deleted) ' "$work/smu.out" | tr '\n' ';' | sed 's/;$/\n/'
# s3_media_upload's os.removedirs also removes emptied AB/CD levels and local_content itself.
pleft=$( (find "$work/media" -type f 2>/dev/null || true) | wc -l)
python3 - "$work/time.txt" "$work/time-smu.txt" "$aged" "$paged" "$pleft" <<'PY'
import re, sys
def read(path):
    t = open(path).read()
    wall = t.split("Elapsed (wall clock) time (h:mm:ss or m:ss): ")[1].split("\n")[0].split(":")
    secs = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall)))
    cpu = float(re.search(r"User time \(seconds\): (\S+)", t)[1]) + float(re.search(r"System time \(seconds\): (\S+)", t)[1])
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t)[1]) / 1024
    return secs, cpu, rss
(ow, oc, orss), (pw, pc, prss) = read(sys.argv[1]), read(sys.argv[2])
aged, paged, left = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
print(f"s3_media_upload: {paged} aged files: wall {pw:.1f} s, client CPU {pc:.1f} s, peak RSS {prss:.0f} MB, S3 requests {paged} HEAD + 0 other, files left {left}")
print(f"aged files per second: ours {aged / ow:.0f}, s3_media_upload {paged / pw:.0f}: ours is {(aged / ow) / (paged / pw):.1f}x faster (issue 7 target: >= 10x); peak RSS ours {orss:.0f} MB (target <= 150 MB)")
PY
