#!/usr/bin/env bash
# Tests the packages as an admin would use them (CI runs it after scripts/test.sh), as root:
#   1. scripts/package.sh builds the .deb and the image (SSO_PACKAGE_OUT: reuse a build).
#   2. dpkg -i: the user, the state directory, the conffile's owner and mode, the units
#      (systemd-analyze verify, exposure <= 1.5, enabled but not started).
#   3. The installed binary's `check` and `upload` as matrix-synapse, with the installed config,
#      against the test servers (s3s-fs, PostgreSQL) and a Synapse config laid out as
#      matrix-synapse-py3 does.
#   4. The daemon as matrix-synapse under the unit's main restrictions (scripts/hardened-run.sh):
#      inotify upload, the read lease, the control socket, /metrics and /health.
#   5. An upgrade to a newer version (the conffile an admin edited is kept), then remove and purge.
#   6. The image: its root filesystem runs `--version` and `check` as UID 991 (chroot), and the
#      image runs for real under podman when podman works here.
# Leaves the machine as it found it (the matrix-synapse user, shared with Synapse, stays).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

log() { printf '==> %s\n' "$*" >&2; }
fail() { log "FAIL: $*"; failed=$((failed + 1)); }
ok() { log "ok: $*"; passed=$((passed + 1)); }
check() { # description command...
  local what=$1
  shift
  if "$@"; then ok "$what"; else fail "$what"; fi
}
passed=0 failed=0
[[ $(id -u) == 0 ]] || { log "run as root (dpkg -i, runuser)"; exit 1; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
out="${SSO_PACKAGE_OUT:-$PWD/target/package}"
export SSO_PACKAGE_OUT="$out"

# --- 1. Build -------------------------------------------------------------------------------------
if [[ "${SSO_PACKAGE_REUSE:-0}" != 1 || ! -f "$out/deb-path" ]]; then
  bash scripts/package.sh
fi
deb=$(cat "$out/deb-path")
version=$(dpkg-deb -f "$deb" Version)
pkg=synapse-s3-offload
if dpkg -s "$pkg" >/dev/null 2>&1; then
  log "$pkg is installed already: purging it first"
  dpkg -P "$pkg" >&2
fi

# --- Test servers -------------------------------------------------------------------------------
# Not under /tmp, /var/tmp or /root: the sandbox of step 4 hides those, as the unit does.
mkdir -p /srv
work=$(mktemp -d /srv/sso-pkg.XXXXXX)
chmod 0755 "$work"
db="t_pkg_$$"
cleanup() {
  [[ -n "${s3pid:-}" ]] && kill "$s3pid" 2>/dev/null
  [[ -n "${daemon_pid:-}" ]] && kill "$daemon_pid" 2>/dev/null
  psql -X -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE IF EXISTS $db" >/dev/null 2>&1 || true
  if mountpoint -q "$out/rootfs/data" 2>/dev/null; then umount "$out/rootfs/data" || true; fi
  dpkg -s "$pkg" >/dev/null 2>&1 && dpkg -P "$pkg" >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT
bucket=pkg-media
start_s3s "$work/s3" "$bucket" sso-pkg-key sso-pkg-secret "$work/s3.log"
endpoint="http://127.0.0.1:$port"
pg_isready -q -h 127.0.0.1 -p 5432 ||
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
psql -X -q -h 127.0.0.1 -U postgres -d postgres -c "CREATE DATABASE $db" >/dev/null
psql -X -q -h 127.0.0.1 -U postgres -d "$db" -f tests/fixtures/synapse_media_schema.sql >/dev/null

# --- 2. Install ---------------------------------------------------------------------------------------
log "dpkg -i $deb"
dpkg -i "$deb" >&2
conf=/etc/$pkg/config.yaml
check "the binary is installed and runs" /usr/bin/$pkg --version
check "user matrix-synapse exists" getent passwd matrix-synapse
check "state_dir is matrix-synapse's, mode 0700" \
  test "$(stat -c '%U:%G %a' /var/lib/$pkg)" = "matrix-synapse:matrix-synapse 700"
check "the config is root:matrix-synapse 0640" test "$(stat -c '%U:%G %a' "$conf")" = "root:matrix-synapse 640"
check "the config is a conffile" grep -qx " $conf [0-9a-f]*" <(dpkg-query -W -f='${Conffiles}\n' $pkg)
check "the config merges Debian's conf.d" grep -qx 'synapse_config_dir: /etc/matrix-synapse/conf.d' "$conf"
unit=/lib/systemd/system/$pkg.service
check "systemd-analyze verify (installed units)" \
  systemd-analyze verify "$unit" /lib/systemd/system/$pkg-audit.service /lib/systemd/system/$pkg-audit.timer
score=$(systemd-analyze security --offline=true "$unit" 2>/dev/null | awk '/Overall exposure level/ {print $(NF-2)}')
check "exposure of the installed unit is $score (<= 1.5)" awk -v s="$score" 'BEGIN { exit !(s != "" && s <= 1.5) }'
check "the daemon is enabled (multi-user.target.wants)" test -L /etc/systemd/system/multi-user.target.wants/$pkg.service
check "the audit timer is enabled (timers.target.wants)" test -L /etc/systemd/system/timers.target.wants/$pkg-audit.timer
if [[ -d /run/systemd/system ]]; then
  check "the daemon is not started before it is configured" bash -c "! systemctl is-active -q $pkg"
else
  log "note: systemd is not PID 1 here: install-time start/stop is not exercised (deb-systemd-invoke skips)"
fi

# --- 3. check as matrix-synapse, with the installed config --------------------------------------
# Synapse's config as matrix-synapse-py3 lays it out: homeserver.yaml plus conf.d/, the bucket in
# conf.d (where admins often put s3_storage_provider); only their directory differs (env overrides).
hs="$work/etc-matrix-synapse"
mkdir -p "$hs/conf.d" "$work/media"
cat >"$hs/homeserver.yaml" <<EOF
server_name: example.com
media_store_path: $work/media
database:
  name: psycopg2
  args: {user: postgres, dbname: $db, host: 127.0.0.1, port: 5432, sslmode: disable}
EOF
cat >"$hs/conf.d/s3.yaml" <<EOF
media_storage_providers:
- module: s3_storage_provider.S3StorageProviderBackend
  store_local: true
  store_remote: true
  store_synchronous: false
  config:
    bucket: $bucket
    endpoint_url: $endpoint
    region_name: us-east-1
    access_key_id: sso-pkg-key
    secret_access_key: sso-pkg-secret
EOF
chown -R matrix-synapse:matrix-synapse "$work/media"
chmod -R go+rX "$hs"
as_synapse() {
  runuser -u matrix-synapse -- env \
    SYNAPSE_S3_OFFLOAD__SYNAPSE_CONFIG="$hs/homeserver.yaml" \
    SYNAPSE_S3_OFFLOAD__SYNAPSE_CONFIG_DIR="$hs/conf.d" "$@"
}
if as_synapse /usr/bin/$pkg check >"$work/check.txt" 2>&1; then
  ok "installed check as matrix-synapse (installed config, test servers)"
else
  fail "installed check as matrix-synapse:"
fi
sed 's/^/    /' "$work/check.txt" >&2
# The guide's next step: upload what is already there, with the installed config.
install -d -o matrix-synapse -g matrix-synapse "$work/media/local_content/00/11"
runuser -u matrix-synapse -- sh -c "printf 'before the daemon' >'$work/media/local_content/00/11/uploadedbycli01'"
if as_synapse /usr/bin/$pkg upload --no-progress >"$work/upload.txt" 2>&1 &&
  [[ -f "$work/s3/$bucket/local_content/00/11/uploadedbycli01" ]]; then
  ok "installed upload as matrix-synapse (the file is in the bucket)"
else
  fail "installed upload as matrix-synapse:"
  sed 's/^/    /' "$work/upload.txt" >&2
fi

# --- 4. The daemon under the unit's restrictions ----------------------------------------------------
if bash scripts/hardened-run.sh "$unit" "$work" "$hs" "$endpoint" "$bucket"; then
  ok "daemon under the hardened unit's restrictions: inotify, read lease, control socket, metrics"
else
  fail "daemon under the hardened unit's restrictions (above)"
fi

# --- 5. Upgrade, remove, purge ---------------------------------------------------------------------
echo "# an admin's edit" >>"$conf"
next="${version%-*}-99"
log "upgrade to $next"
SSO_SKIP_IMAGE=1 SSO_DEB_VERSION="$next" SSO_PACKAGE_OUT="$work/next" bash scripts/package.sh >/dev/null 2>&1 ||
  fail "building $next"
if [[ -f "$work/next/deb-path" ]]; then
  check "dpkg -i (upgrade $version -> $next)" dpkg -i --force-confold "$(cat "$work/next/deb-path")"
  check "the upgrade kept the admin's config" grep -q "^# an admin's edit" "$conf"
  check "the installed version is $next" test "$(dpkg-query -W -f='${Version}' $pkg)" = "$next"
fi
touch /var/lib/$pkg/queue-marker
check "dpkg -r" dpkg -r $pkg
check "remove: the binary is gone" test ! -e /usr/bin/$pkg
check "remove: the config and state stay" test -f "$conf" -a -f /var/lib/$pkg/queue-marker
check "dpkg -P" dpkg -P $pkg
check "purge: the package is gone" bash -c "! dpkg -s $pkg >/dev/null 2>&1"
check "purge: /etc/$pkg is gone" test ! -e /etc/$pkg
check "purge: the state directory is gone" test ! -e /var/lib/$pkg
check "purge: the unit links are gone" test ! -e /etc/systemd/system/multi-user.target.wants/$pkg.service
check "purge: the matrix-synapse user stays (Synapse's)" getent passwd matrix-synapse

# --- 6. The image ------------------------------------------------------------------------------------
rootfs="$out/rootfs"
if ! command -v podman >/dev/null || ! command -v runc >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends podman runc >/dev/null 2>&1 || true
fi
if [[ -x "$rootfs/usr/bin/$pkg" ]]; then
  check "image: --version in its root filesystem (chroot, UID 991)" \
    chroot --userspec=991:991 "$rootfs" /usr/bin/$pkg --version
  # Synapse's /data volume: homeserver.yaml (the bucket inline), media_store, our state.
  data="$work/data"
  mkdir -p "$data/media_store"
  sed "s|media_store_path: .*|media_store_path: /data/media_store|" "$hs/homeserver.yaml" >"$data/homeserver.yaml"
  cat "$hs/conf.d/s3.yaml" >>"$data/homeserver.yaml"
  chown -R 991:991 "$data"
  mount --bind "$data" "$rootfs/data"
  if chroot --userspec=991:991 "$rootfs" /usr/bin/$pkg check >"$work/image-check.txt" 2>&1; then
    ok "image: check in its root filesystem (chroot, UID 991, /data as Synapse's volume)"
  else
    fail "image: check in its root filesystem:"
  fi
  sed 's/^/    /' "$work/image-check.txt" >&2
  umount "$rootfs/data"
  check "image: runs as UID 991 with /health as its health check" \
    python3 -c 'import json,sys; c=json.load(open(sys.argv[1])); assert c["User"]=="991:991", c["User"]; t=c["Healthcheck"]["Test"]; assert t[:3]==["CMD","/bin/busybox","wget"] and t[-1].endswith(":9187/health"), t' "$out/image-config.json"
  if [[ "$(cat "$out/image-format")" == docker-archive ]] && command -v podman >/dev/null &&
    podman --version >/dev/null 2>&1; then
    rc=0
    bash scripts/test-image-podman.sh "$out/$pkg-image.tar" "$data" "$work/s3" "$bucket" || rc=$?
    case $rc in
      0) ok "image: runs under podman (--version, check, the daemon uploads, HEALTHCHECK, stop)" ;;
      2) log "note: podman cannot run containers here (above): the chroot checks stand" ;;
      *) fail "image: under podman (above)" ;;
    esac
  else
    log "note: no podman here: the image was run from its unpacked root filesystem only"
  fi
else
  [[ "${CI:-}" == true ]] && fail "no image root filesystem at $rootfs" || log "no image built: skipped"
fi

printf 'package checks: %s ok, %s failed\n' "$passed" "$failed"
((failed == 0))
