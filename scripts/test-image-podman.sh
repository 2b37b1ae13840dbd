#!/usr/bin/env bash
# test-image-podman.sh ARCHIVE DATA S3_ROOT BUCKET (from scripts/test-package.sh): runs the image
# for real under podman, as a sidecar would: on DATA as Synapse's /data volume (homeserver.yaml,
# media_store/), host network (the test servers listen on loopback).
#   --version; check; then the daemon: a new media file reaches the bucket, the image's own
#   HEALTHCHECK passes, `podman stop` ends it with status 0.
# Where podman cannot run containers (no usable runtime or cgroups), it says so and exits 2.
set -euo pipefail
archive=$1 data=$2 s3root=$3 bucket=$4
log() { printf '==> podman: %s\n' "$*" >&2; }
# vfs: the storage buildah wrote with. runc with cgroupfs: crun refuses hybrid cgroup hierarchies
# (this machine's), podman's systemd cgroup manager needs systemd as PID 1. Limits no higher than
# ours: raising them needs CAP_SYS_RESOURCE, which a sandboxed root may not have.
runtime=()
if command -v runc >/dev/null; then runtime=(--runtime runc); fi
p() { podman --storage-driver vfs "${runtime[@]}" --cgroup-manager cgroupfs "$@"; }
limits=(--ulimit "nofile=$(ulimit -Sn):$(ulimit -Hn)" --ulimit "nproc=4096:4096")
image=$(p load -q -i "$archive" | sed -n 's/^Loaded image: //p' | tail -n1)
[[ -n "$image" ]] || { log "podman load gave no image"; exit 2; }
cid=
cleanup() {
  if [[ -n "$cid" ]]; then p rm -f "$cid" >/dev/null 2>&1 || true; fi
  p rmi -f "$image" >/dev/null 2>&1 || true
}
trap cleanup EXIT
if ! out=$(p run --rm --network host "${limits[@]}" --no-healthcheck "$image" --version 2>&1); then
  log "cannot run containers here: $out"
  exit 2
fi
log "ok: $out"
p run --rm --network host "${limits[@]}" --no-healthcheck -v "$data:/data" "$image" check >&2
log "ok: check in the container"
# The HEALTHCHECK asks 127.0.0.1:9187; with the host network that port must be free here.
if (exec 3<>/dev/tcp/127.0.0.1/9187) 2>/dev/null; then
  log "port 9187 is taken on this host: the daemon run is skipped"
  exit 0
fi
cid=$(p run -d --network host "${limits[@]}" -v "$data:/data" \
  -e SYNAPSE_S3_OFFLOAD__METRICS__LISTEN=127.0.0.1:9187 "$image")
name=local_content/ee/ff/fromthecontainer0001
mkdir -p "$data/media_store/local_content/ee/ff"
printf 'from the container test' >"$data/media_store/$name"
chown -R 991:991 "$data/media_store"
deadline=$((SECONDS + 60))
until [[ -f "$s3root/$bucket/$name" ]]; do
  if ((SECONDS > deadline)); then p logs "$cid" >&2; log "FAIL: the file did not reach the bucket"; exit 1; fi
  sleep 0.5
done
log "ok: the containerised daemon uploaded a new file"
deadline=$((SECONDS + 30))
until p healthcheck run "$cid" >/dev/null 2>&1; do
  if ((SECONDS > deadline)); then p logs "$cid" >&2; log "FAIL: the image's HEALTHCHECK does not pass"; exit 1; fi
  sleep 1
done
log "ok: the image's HEALTHCHECK passes (GET /health)"
p stop -t 30 "$cid" >/dev/null
code=$(p inspect "$cid" --format '{{.State.ExitCode}}')
[[ "$code" == 0 ]] || { p logs "$cid" >&2; log "FAIL: exit status $code after podman stop"; exit 1; }
log "ok: podman stop: exit 0"
