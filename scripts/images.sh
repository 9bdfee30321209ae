#!/usr/bin/env bash
# Build kubetune's two images here from the project's own Dockerfiles, with Debian's buildah and no
# container registry: their base is a local equivalent of python:3.11-slim-bookworm made with
# debootstrap (Debian bookworm's python3.11 and pip), passed as the Dockerfiles' BASE_IMAGE. The
# trainer's has Python's headers too (DeepSpeed builds an op against them); the operator's does not
# (50 MB less).
#
#   scripts/images.sh build           base, operator and trainer images (buildah's layer cache reuses work)
#   scripts/images.sh save IMAGE      write IMAGE as an OCI layout tar to stdout (for `cluster.sh load`)
#   scripts/images.sh pause           the pod sandbox (pause) image, the same way
#   scripts/images.sh sizes           the images and their sizes
#
# The images are named as charts/kubetune/values-local.yaml expects (kubetune-operator:local,
# kubetune-trainer:local-cpu). Needs root.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
base=localhost/kubetune-base/python:3.11-slim-bookworm          # with python3-dev, for the trainer
runtime=localhost/kubetune-base/python:3.11-slim-bookworm-runtime  # without, for the operator
operator=docker.io/library/kubetune-operator:local
trainer=docker.io/library/kubetune-trainer:local-cpu
pause=registry.k8s.io/pause:kubetune
rootfs=""
log() { echo "images: $*" >&2; }

need() {
  local missing=()
  command -v buildah > /dev/null || missing+=(buildah)
  command -v debootstrap > /dev/null || missing+=(debootstrap)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]} from Debian"
    apt-get update -q > /dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" > /dev/null
  fi
}

exists() { buildah images -q "$1" > /dev/null 2>&1; }

base_image() {  # IMAGE ROOTFS-NAME [PACKAGES]: an image from a debootstrap root filesystem
  exists "$1" && return
  [ -f "$cache/$2.tar" ] || base_rootfs "$2" "${3:-}"
  local c; c=$(buildah from scratch)
  buildah add "$c" "$cache/$2.tar" / > /dev/null  # a local tar: buildah unpacks it
  buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin --env LANG=C.UTF-8 \
    --cmd python3 "$c"
  buildah commit -q --rm "$c" "$1" > /dev/null
}

base_rootfs() {  # NAME [PACKAGES]: Debian bookworm made by debootstrap, as a tar kept in the cache
  rootfs=$(mktemp -d "$cache/rootfs.XXXX")
  trap remove_rootfs EXIT
  log "debootstrap: Debian bookworm with python3.11${2:+, $2} and pip (a few minutes)"
  debootstrap --variant=minbase --include="python3,${2:+$2,}python3-pip,python-is-python3,ca-certificates" \
    bookworm "$rootfs" "${DEBIAN_MIRROR:-http://deb.debian.org/debian}" > "$cache/debootstrap.log" 2>&1 ||
    { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
  # As in the official image: pip may install into the system Python (no PEP 668 marker).
  rm -f "$rootfs"/usr/lib/python3*/EXTERNALLY-MANAGED
  # Trust what this machine trusts (a proxy's CA, if any) for pip and apt inside the builds.
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$rootfs/etc/pip.conf"
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    cp /etc/apt/sources.list.d/debian.sources "$rootfs/etc/apt/sources.list.d/" && rm -f "$rootfs/etc/apt/sources.list"
  fi
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
  # As debian:bookworm-slim (the official image's base): no documentation, manual pages or translations
  # (50 MB), neither now nor from packages installed later; the copyright files stay.
  printf 'path-exclude %s\n' '/usr/share/doc/*' '/usr/share/man/*' '/usr/share/info/*' '/usr/share/locale/*' \
    > "$rootfs/etc/dpkg/dpkg.cfg.d/slim"
  printf 'path-include %s\n' '/usr/share/doc/*/copyright' '/usr/share/locale/locale.alias' >> "$rootfs/etc/dpkg/dpkg.cfg.d/slim"
  find "$rootfs/usr/share/doc" -type f ! -name copyright -delete
  find "$rootfs"/usr/share/{man,info,locale} -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
  tar -C "$rootfs" --numeric-owner -cf "$cache/$1.tar.tmp" . && mv "$cache/$1.tar.tmp" "$cache/$1.tar"
  remove_rootfs
  trap - EXIT
}

remove_rootfs() {  # unmount what debootstrap left mounted inside, then delete it
  [[ "$rootfs" == "$cache"/rootfs.* ]] || return 0
  awk -v r="$rootfs/" 'index($2, r) == 1 {print $2}' /proc/mounts | sort -r | xargs -r umount -l
  rm -rf "$rootfs"
}

build() {
  need
  mkdir -p "$cache"
  # python3-dev: the official image has Python's headers, and DeepSpeed's JIT-built ops need them.
  base_image "$base" base-rootfs python3-dev
  base_image "$runtime" runtime-rootfs
  local start=$SECONDS
  for spec in "operator/Dockerfile $operator $runtime" "trainer_image/Dockerfile $trainer $base"; do
    set -- $spec
    log "building $2 from $1"
    buildah build --layers --network host -q --build-arg "BASE_IMAGE=$3" -f "$root/$1" -t "$2" "$root" > /dev/null
  done
  log "built in $((SECONDS - start))s"
  buildah rmi --prune > /dev/null 2>&1 || true  # layers of earlier builds no tag needs
  sizes
}

save() {  # IMAGE as an OCI layout tar on stdout
  # Through an OCI layout folder kept in the cache: buildah writes only the layers that changed
  # (uncompressed, so they keep their digests), and containerd skips the layers it already has.
  # The folder is stamped with the image's ID: pushing even an unchanged 3 GB image re-hashes every
  # layer (~80 s), so an image already pushed is only tarred.
  local dir="$cache/oci/${1//[\/:]/_}" id
  id=$(buildah inspect --type image --format '{{.FromImageID}}' "$1")
  if [ "$(cat "$dir.image-id" 2> /dev/null)" != "$id" ]; then
    rm -f "$dir.image-id"
    mkdir -p "$dir"
    buildah push -q --disable-compression "$1" "oci:$dir:$1" > /dev/null
    prune_blobs "$dir"
    echo "$id" > "$dir.image-id"
  fi
  tar -C "$dir" -c .
}

prune_blobs() {  # DIR: drop the blobs of earlier builds that no manifest names any more
  python3 - "$1" <<'PY'
import json, sys
from pathlib import Path
root = Path(sys.argv[1]); blobs = root / "blobs" / "sha256"
keep = set()
for m in json.loads((root / "index.json").read_text())["manifests"]:
    digest = m["digest"].split(":")[1]; keep.add(digest)
    manifest = json.loads((blobs / digest).read_text())
    keep.update(d["digest"].split(":")[1] for d in [manifest["config"], *manifest["layers"]])
for blob in blobs.iterdir():
    if blob.name not in keep:
        blob.unlink()
PY
}

pause_image() {
  need
  mkdir -p "$cache"
  if ! exists "$pause"; then
    local c bin; bin=$(bash "$root/scripts/controlplane.sh" node)
    c=$(buildah from scratch)
    buildah copy "$c" "$bin/pause" /pause > /dev/null
    buildah config --entrypoint '["/pause"]' "$c"
    buildah commit -q --rm "$c" "$pause" > /dev/null
  fi
  save "$pause"
}

sizes() { buildah images --format '{{.Name}}:{{.Tag}} {{.Size}}' | grep -E 'kubetune|pause' >&2; }

case "${1:-}" in
  build) build ;;
  save) save "$2" ;;
  pause) pause_image ;;
  sizes) sizes ;;
  *) echo "usage: $0 build | save IMAGE | pause | sizes" >&2; exit 2 ;;
esac
