#!/usr/bin/env bash
# build-image.sh BINARY VERSION OUT: the container image, without a Docker daemon.
#
# The root filesystem is assembled from files, not from a base image (no registry but Debian's
# packages is reachable here, and the daemon needs little): the binary, the shared libraries it
# links (glibc of this Debian), CA certificates, a passwd/group naming UID/GID 991 (the UID of
# matrixdotorg/synapse, which owns the media), the config below, and busybox-static for the
# health check only (there is no other shell). Then buildah (as root, vfs storage) turns it into
# an image with its entrypoint, user, volume and HEALTHCHECK, written to OUT as a docker-archive;
# without buildah, umoci writes an OCI image (OCI has no HEALTHCHECK: the compose file and the
# Kubernetes probe carry it). The archive is unpacked again into OUT/rootfs (what tests run).
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=$1 version=$2 out=$3
log() { printf '==> %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
need() { # command apt-package
  command -v "$1" >/dev/null && return 0
  log "Installing $2 (for $1)"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >&2 ||
    { apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$2" >&2; } || true
  command -v "$1" >/dev/null
}
name=synapse-s3-offload
image="$name:$version"
archive="$out/$name-image.tar"

# --- Root filesystem -------------------------------------------------------------------------------
need busybox busybox-static || die "busybox-static is needed for the image's health check"
busybox=$(command -v busybox)
{ ldd "$busybox" 2>&1 || true; } | grep -q 'not a dynamic executable' || die "$busybox is not static (install busybox-static)"
root=$(mktemp -d "$out/rootfs-build.XXXXXX")
trap 'rm -rf "$root"' EXIT
install -d "$root/usr/bin" "$root/bin" "$root/etc/ssl/certs" "$root/etc/synapse-s3-offload" \
  "$root/usr/share/doc/$name" "$root/var/lib/$name"
install -d -m 1777 "$root/tmp"
install -d -o 991 -g 991 -m 0750 "$root/data"
install -m 0755 "$bin" "$root/usr/bin/$name"
install -m 0755 "$busybox" "$root/bin/busybox"
# The libraries the binary links, and the dynamic loader, at the paths ldd names.
ldd "$bin" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u |
  while read -r lib; do cp --parents -L "$lib" "$root/"; done
cp -L /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/" ||
  die "no /etc/ssl/certs/ca-certificates.crt (apt-get install ca-certificates)"
printf 'root:x:0:0:root:/root:/sbin/nologin\nsynapse:x:991:991:synapse-s3-offload:/data:/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\nsynapse:x:991:\n' >"$root/etc/group"
printf 'hosts: files dns\n' >"$root/etc/nsswitch.conf"
install -m 0644 dist/container/config.yaml "$root/etc/synapse-s3-offload/config.yaml"
install -m 0644 config/example.yaml "$root/usr/share/doc/$name/config.yaml"
install -d -o 991 -g 991 -m 0700 "$root/var/lib/$name"

# --- Image -----------------------------------------------------------------------------------------
# Exec form (buildah splits it on spaces): no shell involved.
health='/bin/busybox wget -q -O /dev/null http://127.0.0.1:9187/health'
rm -f "$archive"
if need buildah buildah; then
  log "buildah: $image"
  # Docker format: OCI image configs have no HEALTHCHECK.
  export BUILDAH_FORMAT=docker
  b() { buildah --storage-driver vfs "$@"; }
  ctr=$(b from --quiet scratch)
  mnt=$(b mount "$ctr")
  cp -a "$root/." "$mnt/"
  b umount "$ctr" >/dev/null
  b config \
    --user 991:991 --workingdir /data --volume /data --port 9187 \
    --env SYNAPSE_S3_OFFLOAD_CONFIG=/etc/synapse-s3-offload/config.yaml --env RUST_LOG=info \
    --entrypoint "[\"/usr/bin/$name\"]" --cmd run \
    --healthcheck "CMD $health" --healthcheck-interval 30s --healthcheck-timeout 5s \
    --healthcheck-start-period 1m --healthcheck-retries 3 \
    --label "org.opencontainers.image.title=$name" \
    --label "org.opencontainers.image.version=$version" \
    --label "org.opencontainers.image.description=Uploads a Synapse media store to S3 and frees local disk" \
    --label "org.opencontainers.image.licenses=Apache-2.0" \
    "$ctr"
  b commit --quiet --format docker --rm "$ctr" "localhost/$image" >/dev/null
  b push --quiet "localhost/$image" "docker-archive:$archive:$image"
  b rmi "localhost/$image" >/dev/null || true
  format=docker-archive
elif need umoci umoci; then
  log "buildah is not available: umoci builds an OCI image (no HEALTHCHECK in OCI images)"
  layout=$(mktemp -d) && umoci init --layout "$layout/oci"
  umoci new --image "$layout/oci:$version"
  umoci unpack --image "$layout/oci:$version" "$layout/bundle"
  cp -a "$root/." "$layout/bundle/rootfs/"
  umoci repack --image "$layout/oci:$version" "$layout/bundle"
  umoci config --image "$layout/oci:$version" --config.user 991:991 --config.workingdir /data \
    --config.volume /data --config.exposedports 9187/tcp \
    --config.env SYNAPSE_S3_OFFLOAD_CONFIG=/etc/synapse-s3-offload/config.yaml --config.env RUST_LOG=info \
    --config.entrypoint "/usr/bin/$name" --config.cmd run
  tar -C "$layout/oci" -cf "$archive" .
  rm -rf "$layout"
  format=oci-archive
else
  die "neither buildah nor umoci can be had: no image (the .deb is built)"
fi
log "image: $archive ($format, $(($(stat -c %s "$archive") / 1024 / 1024)) MiB)"

# --- Unpack it again: what the tests run ------------------------------------------------------------
rm -rf "$out/rootfs"
mkdir -p "$out/rootfs"
if [[ $format == docker-archive ]]; then
  # docker-archive: manifest.json names the layers in order.
  tmp=$(mktemp -d)
  tar -C "$tmp" -xf "$archive"
  python3 -c 'import json,sys; [print(l) for l in json.load(open(sys.argv[1]))[0]["Layers"]]' "$tmp/manifest.json" |
    while read -r layer; do tar -C "$out/rootfs" --same-owner -xf "$tmp/$layer"; done
  python3 -c 'import json,sys; m=json.load(open(sys.argv[1]))[0]; print(json.dumps(json.load(open(sys.argv[2]+"/"+m["Config"]))["config"], indent=1))' \
    "$tmp/manifest.json" "$tmp" >"$out/image-config.json"
  rm -rf "$tmp"
else
  tmp=$(mktemp -d)
  tar -C "$tmp" -xf "$archive"
  umoci unpack --image "$tmp:$version" "$tmp/bundle" >/dev/null
  cp -a "$tmp/bundle/rootfs/." "$out/rootfs/"
  rm -rf "$tmp"
fi
echo "$format" >"$out/image-format"
log "image root filesystem: $out/rootfs ($(du -sh "$out/rootfs" | cut -f1))"
