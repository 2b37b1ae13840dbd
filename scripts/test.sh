#!/usr/bin/env bash
# The test command (README, CI): makes sure every service the tests need is installed and running,
# then runs fmt, clippy and the whole test suite against them.
#
# - S3: s3s-fs 0.14.1 (crates.io) on a free loopback port with SigV4 credentials, data in a temp dir.
# - PostgreSQL: the machine's cluster on 127.0.0.1:5432 (started with pg_ctlcluster if it is down).
#
# Env: SSO_SKIP_LINT=1 skips fmt/clippy; extra arguments go to `cargo test`.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*" >&2; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_port() { # host port seconds
  local deadline=$((SECONDS + $3))
  until (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; do
    if ((SECONDS > deadline)); then return 1; fi
    sleep 0.1
  done
}

# --- S3 test server -------------------------------------------------------------------------
S3S_FS=${SSO_S3S_FS:-$(command -v s3s-fs || true)}
if [[ -z "$S3S_FS" && -x "$HOME/.cargo/bin/s3s-fs" ]]; then S3S_FS="$HOME/.cargo/bin/s3s-fs"; fi
if [[ -z "$S3S_FS" ]]; then
  log "Installing s3s-fs 0.14.1 (the S3 test server; ~5 min, once)"
  cargo install s3s-fs --version 0.14.1 --features binary --locked
  S3S_FS="$HOME/.cargo/bin/s3s-fs"
fi
export SSO_TEST_S3FS_BIN="$S3S_FS"
export SSO_TEST_S3_ACCESS_KEY=sso-test-key
export SSO_TEST_S3_SECRET_KEY=sso-test-secret
s3_root=$(mktemp -d /tmp/sso-s3.XXXXXX)
s3_port=$(free_port)
"$S3S_FS" --host 127.0.0.1 --port "$s3_port" \
  --access-key "$SSO_TEST_S3_ACCESS_KEY" --secret-key "$SSO_TEST_S3_SECRET_KEY" "$s3_root" \
  >"$s3_root.log" 2>&1 &
s3_pid=$!
moto_pid=
cleanup() {
  kill "$s3_pid" $moto_pid 2>/dev/null || true
  wait "$s3_pid" $moto_pid 2>/dev/null || true
  rm -rf "$s3_root" "$s3_root.log" "$s3_root.moto.log"
}
trap cleanup EXIT
if ! wait_port 127.0.0.1 "$s3_port" 30; then
  log "s3s-fs did not start:"; cat "$s3_root.log" >&2; exit 1
fi
export SSO_TEST_S3_ENDPOINT="http://127.0.0.1:$s3_port"
log "s3s-fs listening on $SSO_TEST_S3_ENDPOINT"

# --- A second S3 server whose listings carry ETags -------------------------------------------
# s3s-fs lists objects without their ETag, so the sweep's dense mode (confirming files from a
# listing, src/sweep/dense.rs) would fall back to a HEAD for every file there. moto's server
# (PyPI, in a venv of its own, installed once) lists them as S3 does; the dense-sweep tests run on
# both. Under CI=true a moto that cannot be installed or started fails those tests.
moto_venv=${SSO_MOTO_VENV:-$HOME/.cache/sso-moto-venv}
if [[ ! -x "$moto_venv/bin/moto_server" ]]; then
  log "Installing moto's S3 server into $moto_venv (once, ~1 min)"
  (python3 -m venv "$moto_venv" && "$moto_venv/bin/pip" install -q "moto[server]==5.2.5") >&2 ||
    log "could not install moto (the dense-sweep tests will fail)"
fi
if [[ -x "$moto_venv/bin/moto_server" ]]; then
  moto_port=$(free_port)
  "$moto_venv/bin/moto_server" -H 127.0.0.1 -p "$moto_port" >"$s3_root.moto.log" 2>&1 &
  moto_pid=$!
  if wait_port 127.0.0.1 "$moto_port" 60; then
    export SSO_TEST_MOTO_ENDPOINT="http://127.0.0.1:$moto_port"
    log "moto listening on $SSO_TEST_MOTO_ENDPOINT"
  else
    log "moto did not start:"; cat "$s3_root.moto.log" >&2
  fi
fi

# --- PostgreSQL -------------------------------------------------------------------------------
if command -v pg_isready >/dev/null; then
  if ! pg_isready -q -h 127.0.0.1 -p 5432; then
    log "Starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
    for _ in $(seq 1 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
  fi
  pg_isready -h 127.0.0.1 -p 5432 >&2 || log "PostgreSQL is not running (tests that need it will fail)"
  # Databases left by earlier runs (each test creates its own t_db_<pid>_<n>); those of a test
  # process still alive belong to a concurrent run and are left alone.
  psql -X -h 127.0.0.1 -U postgres -d postgres -Atc "SELECT datname FROM pg_database WHERE datname LIKE 't\_db\_%'" 2>/dev/null |
    while read -r db; do
      pid=$(cut -d_ -f3 <<<"$db")
      if [[ "$pid" =~ ^[0-9]+$ && -d "/proc/$pid" ]]; then continue; fi
      psql -X -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS \"$db\"" >/dev/null 2>&1 || true
    done
fi

# --- systemd-analyze (the unit-file test) ----------------------------------------------------
if ! command -v systemd-analyze >/dev/null; then
  log "Installing systemd (for systemd-analyze verify)"
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd) >&2 || log "could not install systemd"
fi

# --- cargo audit (offline only) ---------------------------------------------------------------
# The RustSec advisory database is fetched from GitHub, which CI cannot reach: audit against a
# local copy, by default the snapshot in ../shared/advisory-db beside this checkout (see
# ../shared/advisory-db.README), or SSO_ADVISORY_DB. cargo-audit is installed once if missing.
# Under CI=true a missing database is a failure, never a silent skip. SSO_SKIP_AUDIT=1 skips.
advisory_db=${SSO_ADVISORY_DB:-$(cd .. && pwd)/shared/advisory-db}
if [[ "${SSO_SKIP_AUDIT:-0}" == 1 ]]; then
  log "cargo audit skipped (SSO_SKIP_AUDIT=1)"
elif [[ -d "$advisory_db" ]]; then
  if ! cargo audit --version >/dev/null 2>&1; then
    log "Installing cargo-audit (~5 min, once)"
    cargo install cargo-audit --locked
  fi
  log "cargo audit (advisory database $advisory_db)"
  cargo audit --no-fetch --stale --db "$advisory_db"
elif [[ "${CI:-}" == true ]]; then
  log "no advisory database at $advisory_db (set SSO_ADVISORY_DB): cargo audit cannot run"; exit 1
else
  log "cargo audit skipped: no advisory database at $advisory_db (set SSO_ADVISORY_DB to a local copy of the RustSec advisory database)"
fi

# --- Lint and test -------------------------------------------------------------------------------
if [[ "${SSO_SKIP_LINT:-0}" != 1 ]]; then
  log "cargo fmt --check"
  cargo fmt --all -- --check
  log "cargo clippy"
  cargo clippy --all-targets --locked -- -D warnings
fi
log "cargo test"
cargo test --locked "$@"
