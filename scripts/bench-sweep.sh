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
#
# Dense mode (issue 23): each sweep case runs on the same files (restored with their mtimes from a
# pristine copy), one line per case: `--cases` lists them as LISTING/RECORDS pairs, LISTING one of
# never (one HEAD per file), auto (the default rule), always; RECORDS `records` (the state `upload`
# left) or `fresh` (no records: the first sweep after a migration, every file read). `--server moto`
# runs moto's S3 server (PyPI; its listings carry ETags, which s3s-fs's do not, so on s3s-fs a dense
# sweep still HEADs every file); `--server seaweedfs`, `garage` or `s3rver` starts that server as the
# provider matrix does (scripts/servers.sh: installed once, cached). `--rtt-ms N` puts examples/latency_proxy.rs between every client
# (ours and s3_media_upload) and the server, adding N ms per round trip.
#
# With --sqlite the database is a SQLite file with Synapse's real schema
# (tests/fixtures/synapse_sqlite_schema.sql), in WAL mode as Synapse keeps it, and the peer run is
# skipped (this compares our two backends: run once with and once without --sqlite).
#
# usage: scripts/bench-sweep.sh [--rows 1000000] [--aged 100000] [--concurrency 16]
#                               [--peer-divisor 1] [--no-peer]
#                               [--server s3s|moto|seaweedfs|garage|s3rver]
#                               [--cases "never/records auto/records never/fresh auto/fresh"]
#                               [--rtt-ms 0] [--sqlite]
set -euo pipefail
cd "$(dirname "$0")/.."
rows=1000000 aged=100000 concurrency=16 divisor=1 peer=1 server=s3s rtt=0 sqlite=0
s3key=bench s3secret=benchsecret
cases="never/records auto/records never/fresh auto/fresh"
while (($#)); do
  case "$1" in
    --rows) rows=$2; shift 2 ;;
    --aged) aged=$2; shift 2 ;;
    --concurrency) concurrency=$2; shift 2 ;;
    --peer-divisor) divisor=$2; shift 2 ;;
    --no-peer) peer=0; shift ;;
    --server) server=$2; shift 2 ;;
    --cases) cases=$2; shift 2 ;;
    --rtt-ms) rtt=$2; shift 2 ;;
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
proxypid= s3pid=
trap 'kill $s3pid $proxypid 2>/dev/null || true; [[ -f "$work/server/pid" ]] && stop "$work/server"; rm -rf "$work" "$s3root"; for d in $db $pdb; do psql_ -d postgres -c "DROP DATABASE IF EXISTS $d" >/dev/null 2>&1; done' EXIT
case "$server" in
  s3s) start_s3s "$s3root" bench bench benchsecret "$work/s3s.log" ;;
  moto)
    moto_venv=${SSO_MOTO_VENV:-$HOME/.cache/sso-moto-venv}
    if [[ ! -x "$moto_venv/bin/moto_server" ]]; then
      python3 -m venv "$moto_venv" && "$moto_venv/bin/pip" install -q "moto[server]==5.2.5"
    fi
    port=$(free_port)
    "$moto_venv/bin/moto_server" -H 127.0.0.1 -p "$port" >"$work/moto.log" 2>&1 &
    s3pid=$!
    for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.2; done
    AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=benchsecret "$moto_venv/bin/python" -c \
      "import boto3; boto3.client('s3', endpoint_url='http://127.0.0.1:$port', region_name='us-east-1').create_bucket(Bucket='bench')"
    ;;
  seaweedfs | garage | s3rver)
    source scripts/servers.sh
    dir=$work/server
    mkdir -p "$dir"
    "start_$server"
    s3key=$key s3secret=$secret
    create_bucket bench
    ;;
  *) echo "--server s3s, moto, seaweedfs, garage or s3rver" >&2; exit 2 ;;
esac
s3port=$port
if ((rtt > 0)); then
  # The latency proxy (examples/latency_proxy.rs): every client talks to it, it to the server.
  # With SSO_BIN naming a debug build of ours the proxy is a debug build too (no release build
  # needed); an SSO_BIN under a release directory gets the release proxy (a debug proxy adds its
  # own delay per chunk to the RTT being measured).
  profile=release
  if [[ -n "${SSO_BIN:-}" && "$SSO_BIN" != */release/* ]]; then profile=debug; fi
  cargo build --locked -q --example latency_proxy $([[ $profile == release ]] && echo --release)
  port=$(free_port)
  "${CARGO_TARGET_DIR:-$PWD/target}/$profile/examples/latency_proxy" --listen "127.0.0.1:$port" \
    --upstream "127.0.0.1:$s3port" --delay "$((rtt / 2))ms" >"$work/proxy.log" 2>&1 &
  proxypid=$!
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
  echo "==> Through the latency proxy: +$rtt ms per round trip"
fi

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

# write_files N [DIR]: the files of rows 1..N (the aged ones), 1-8 KB each; the same bytes every
# time.
write_files() {
  python3 - "${2:-$work/media}" "$1" <<'PY'
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
write_files "$aged" "$work/pristine"
cp -a "$work/pristine" "$work/media"
cat >"$work/config.yaml" <<YAML
media_store_path: $work/media
state_dir: $work/state
s3:
  bucket: bench
  endpoint_url: http://127.0.0.1:$port
  access_key_id: $s3key
  secret_access_key: $s3secret
upload:
  concurrency: 16
$database_yaml
sweep:
  keep_local_for: 30d
  confirm_synapse_reads_from_bucket: true
  concurrency: $concurrency
  listing: LISTING
YAML
sed "s/LISTING/auto/; s/127.0.0.1:$port/127.0.0.1:$s3port/" "$work/config.yaml" >"$work/upload.yaml"
"$bin" --config "$work/upload.yaml" upload --no-progress 2>/dev/null
cp -a "$work/state" "$work/state.uploaded"

# One sweep per case, each on the files as written (same mtimes: the records still match them).
first=
for c in $cases; do
  listing=${c%/*} records=${c#*/}
  rm -rf "$work/media" "$work/state"
  cp -a "$work/pristine" "$work/media"
  if [[ $records == records ]]; then cp -a "$work/state.uploaded" "$work/state"; fi
  sed "s/LISTING/$listing/" "$work/config.yaml" >"$work/sweep.yaml"
  echo "==> sweep (sweep.listing: $listing, $records)"
  /usr/bin/time -v -o "$work/time-$listing-$records.txt" "$bin" --config "$work/sweep.yaml" sweep >"$work/sweep.out" 2>"$work/sweep.err" \
    || { tail -5 "$work/sweep.err" >&2; exit 1; }
  summary=$(tail -1 "$work/sweep.out")
  echo "$summary"
  # The summary's count: the report lists at most 1,000 deleted paths.
  deleted=$(grep -oP 'deleted \K[0-9]+(?= files)' <<<"$summary" || echo "?")
  left=$(find "$work/media/local_content" -type f | wc -l)
  t="$work/time-$listing-$records.txt"
  wall=$(grep -oP 'Elapsed \(wall clock\) time.*: \K.*' "$t")
  rss=$(grep -oP 'Maximum resident set size \(kbytes\): \K.*' "$t")
  cpu=$(awk -F': ' '/User time|System time/ {s += $2} END {print s}' "$t")
  reqs=$(grep -oP 'S3 requests: \K[0-9]+ HEAD, [0-9]+ LIST' <<<"$summary" || echo "?")
  echo "[$listing/$records] $( ((sqlite)) && echo SQLite || echo PostgreSQL): rows $rows, aged files $aged: wall $wall, client CPU ${cpu}s, peak RSS $((rss / 1024)) MB, S3 requests $reqs, deleted $deleted, files left $left"
  first=${first:-$t}
done

((peer)) || exit 0
prows=$((rows / divisor)) paged=$((aged / divisor))
if ((divisor == 1)); then
  pdb=$db # the sweep changes no row: the same database serves again
else
  make_db "$pdb" "$prows" "$paged"
fi
echo "==> s3_media_upload update + upload --delete on $prows rows, $paged aged files$( ((divisor > 1)) && echo " (a ${divisor}x smaller copy)")"
rm -rf "$work/media"
if ((divisor == 1)); then cp -a "$work/pristine" "$work/media"; else write_files "$paged"; fi
smu_database_yaml "$work/smu" "$pdb"
export AWS_ACCESS_KEY_ID=$s3key AWS_SECRET_ACCESS_KEY=$s3secret AWS_DEFAULT_REGION=us-east-1
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
python3 - "$work/time-smu.txt" "$aged" "$paged" "$pleft" $(for c in $cases; do echo "$work/time-${c%/*}-${c#*/}.txt"; done) <<'PY'
import re, sys
def read(path):
    t = open(path).read()
    wall = t.split("Elapsed (wall clock) time (h:mm:ss or m:ss): ")[1].split("\n")[0].split(":")
    secs = sum(float(x) * 60 ** i for i, x in enumerate(reversed(wall)))
    cpu = float(re.search(r"User time \(seconds\): (\S+)", t)[1]) + float(re.search(r"System time \(seconds\): (\S+)", t)[1])
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", t)[1]) / 1024
    return secs, cpu, rss
pw, pc, prss = read(sys.argv[1])
aged, paged, left = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
print(f"s3_media_upload: {paged} aged files: wall {pw:.1f} s, client CPU {pc:.1f} s, peak RSS {prss:.0f} MB, S3 requests {paged} HEAD + 0 other, files left {left}")
for path in sys.argv[5:]:
    case = path.rsplit("time-", 1)[1][:-4]
    ow, oc, orss = read(path)
    print(f"[{case}] aged files per second: ours {aged / ow:.0f}, s3_media_upload {paged / pw:.0f}: ours is {(aged / ow) / (paged / pw):.1f}x faster; client CPU ours {oc:.1f} s; peak RSS ours {orss:.0f} MB")
PY
