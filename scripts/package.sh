#!/usr/bin/env bash
# Builds what an admin installs, from a clean checkout, into $SSO_PACKAGE_OUT (default target/package):
#   - synapse-s3-offload_<version>_<arch>.deb  (cargo-deb: binary, units, conffile, maintainer scripts)
#   - synapse-s3-offload-image.tar              (container image, docker-archive; built with buildah,
#                                                no Docker daemon; see dist/container/)
#   - rootfs/                                    (the image's root filesystem, as unpacked)
# and checks the packaging: lintian on the .deb, promtool on the alert rules, the units' exposure.
#
# Needs (installed once when missing, as root through apt/cargo): cargo-deb, buildah, lintian,
# prometheus (promtool), busybox-static (the image's health check). A tool that cannot be had is a
# failure under CI=true, and a clear skip otherwise.
# Env: SSO_SKIP_IMAGE=1 builds the .deb only; SSO_DEB_VERSION overrides the package version.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf '==> %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
out="${SSO_PACKAGE_OUT:-$PWD/target/package}"
mkdir -p "$out"

need() { # command apt-package: installs the Debian package when the command is missing
  command -v "$1" >/dev/null && return 0
  log "Installing $2 (for $1)"
  if [[ -z "${SSO_APT_UPDATED:-}" ]]; then apt-get update -qq >&2 || true; export SSO_APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >&2 || true
  command -v "$1" >/dev/null && return 0
  if [[ "${CI:-}" == true ]]; then die "$1 (Debian package $2) is not available"; fi
  log "$1 is not available (Debian package $2): skipping what needs it"
  return 1
}

# --- The binary ------------------------------------------------------------------------------------
log "cargo build --release"
cargo build --release --locked
bin="$CARGO_TARGET_DIR/release/synapse-s3-offload"
size=$(stat -c %s "$bin")
log "release binary: $((size / 1024 / 1024)) MiB ($size bytes), $(file -b "$bin" 2>/dev/null | grep -o 'stripped\|not stripped' || echo '?')"
version=$("$bin" --version | awk '{print $2}')

# --- The .deb ----------------------------------------------------------------------------------------
if ! cargo deb --version >/dev/null 2>&1; then
  log "Installing cargo-deb (once, ~3 min)"
  cargo install cargo-deb --version 3.8.0 --locked
fi
# The conffile: the example with Debian's conf.d merged (matrix-synapse-py3 runs Synapse with
# --config-path homeserver.yaml --config-path conf.d/). The example itself leaves it commented
# out: a conf.d that does not exist is an error.
mkdir -p target/package
sed 's|^# synapse_config_dir: /etc/matrix-synapse/conf.d .*|synapse_config_dir: /etc/matrix-synapse/conf.d|' \
  config/example.yaml >target/package/config.yaml
grep -q '^synapse_config_dir: /etc/matrix-synapse/conf.d$' target/package/config.yaml ||
  die "config/example.yaml no longer has the commented synapse_config_dir line package.sh uncomments"
deb_args=(--no-build --no-strip --output "$out")
if [[ -n "${SSO_DEB_VERSION:-}" ]]; then deb_args+=(--deb-version "$SSO_DEB_VERSION"); fi
deb=$(cargo deb "${deb_args[@]}" | tail -n1)
[[ -f "$deb" ]] || die "cargo deb did not print the .deb it wrote"
log "built $deb ($(($(stat -c %s "$deb") / 1024)) KiB)"
echo "$deb" >"$out/deb-path"

if need lintian lintian; then
  # Overrides (dist/debian/lintian-overrides, shipped): the conffile's 0640 is deliberate.
  log "lintian"
  lintian --tag-display-limit 0 "$deb" 2>&1 | grep -v '^running with root privileges' | tee "$out/lintian.txt" >&2 || true
  if grep -q '^[EW]:' "$out/lintian.txt"; then die "lintian reports errors or warnings (above; $out/lintian.txt)"; fi
fi

# --- Units and monitoring --------------------------------------------------------------------------
if need systemd-analyze systemd; then
  for unit in synapse-s3-offload.service synapse-s3-offload-audit.service; do
    score=$(systemd-analyze security --offline=true "dist/$unit" 2>/dev/null | awk '/Overall exposure level/ {print $(NF-2)}')
    log "$unit: systemd-analyze security exposure $score (target <= 1.5)"
    awk -v s="$score" 'BEGIN { exit !(s != "" && s <= 1.5) }' || die "$unit: exposure $score is above 1.5"
  done
fi
if need promtool prometheus; then
  log "promtool check rules / test rules"
  promtool check rules dist/monitoring/alerts.yml >&2
  (cd dist/monitoring && promtool test rules alerts.test.yml) >&2
fi
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); assert d["panels"], "no panels"' \
  dist/monitoring/grafana-dashboard.json || die "dist/monitoring/grafana-dashboard.json is not a dashboard"

# --- The container image -----------------------------------------------------------------------------
if [[ "${SSO_SKIP_IMAGE:-0}" == 1 ]]; then
  log "image skipped (SSO_SKIP_IMAGE=1)"
  exit 0
fi
bash dist/container/build-image.sh "$bin" "$version" "$out"
