#!/usr/bin/env bash
# The end-to-end test: the whole job as real pods (tests/e2e).
#
#   bash scripts/e2e.sh
#       On this machine (root): starts scripts/cluster.sh's one-node cluster, builds both images from
#       the Dockerfiles (scripts/images.sh), loads them into the node, starts Kueue (scripts/kueue.sh),
#       runs the tests, stops the cluster (KUBETUNE_KEEP_CLUSTER=1 leaves it up to look around).
#   KUBECONFIG=~/.kube/config KUBETUNE_E2E_HOST_IP=172.18.0.1 bash scripts/e2e.sh
#       Against another cluster, e.g. kind, whose node already has kubetune-operator:local and
#       kubetune-trainer:local-cpu (`kind load docker-image ...`); KUBETUNE_E2E_HOST_IP is an address
#       of this machine its pods can reach (for kind, the docker network's gateway). The Kueue test
#       (tests/e2e/test_queues.py) runs where Kueue and hack/kueue/queues.yaml are installed, else skips.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
bash scripts/setup.sh
bin=$(bash scripts/controlplane.sh)  # kubectl and helm

if [ -z "${KUBECONFIG:-}" ]; then
  start=$SECONDS
  kubeconfig=$(bash scripts/cluster.sh up)
  [ "${KUBETUNE_KEEP_CLUSTER:-}" = 1 ] || trap 'bash scripts/cluster.sh down' EXIT
  echo "e2e: cluster up in $((SECONDS - start))s" >&2
  start=$SECONDS
  # Kueue's manager builds (when not cached) while the images do: much of their time is waiting on downloads.
  bash scripts/controlplane.sh kueue > /dev/null & kueue_build=$!
  bash scripts/images.sh build
  for image in docker.io/library/kubetune-operator:local docker.io/library/kubetune-trainer:local-cpu; do
    bash scripts/cluster.sh load "$image"
  done
  echo "e2e: images built and loaded in $((SECONDS - start))s" >&2
  wait $kueue_build
  start=$SECONDS
  bash scripts/kueue.sh up e2e-team-a e2e-team-b  # tests/e2e/test_queues.py's teams
  echo "e2e: Kueue up in $((SECONDS - start))s" >&2
  export KUBETUNE_E2E_KUEUE=1
  export KUBETUNE_E2E_HOST_IP="${KUBETUNE_E2E_HOST_IP:-$(bash scripts/cluster.sh node-ip)}"
else
  kubeconfig="$KUBECONFIG"
fi

rc=0
KUBETUNE_E2E_KUBECONFIG="$kubeconfig" KUBETUNE_E2E_BIN="$bin" \
  .venv/bin/python -m pytest tests/e2e -m e2e -p no:cacheprovider "$@" || rc=$?
if [ $rc != 0 ]; then  # what a user would look at, kept after the cluster is gone
  out="$root/out/e2e"; mkdir -p "$out"
  k() { "$bin/kubectl" --kubeconfig "$kubeconfig" "$@" 2>&1; }
  k get ftj,jobs,pods,svc,deploy -A -o wide > "$out/objects.txt"
  k get ftj -A -o yaml > "$out/finetunejobs.yaml"
  k get workloads.kueue.x-k8s.io,clusterqueues.kueue.x-k8s.io -A -o yaml > "$out/kueue.yaml" || true
  k get events -A --sort-by=.lastTimestamp > "$out/events.txt"
  k get pods -A -o jsonpath='{range .items[*]}{.metadata.namespace} {.metadata.name}{"\n"}{end}' |
    while read -r ns pod; do k logs -n "$ns" "$pod" --all-containers --prefix > "$out/$ns.$pod.log"; done
  [ -d "${KUBETUNE_CACHE:-$HOME/.cache/kubetune}/cluster/logs" ] && cp -r "${KUBETUNE_CACHE:-$HOME/.cache/kubetune}/cluster/logs" "$out/cluster-logs"
  echo "e2e: failed; objects, events and logs in $out" >&2
fi
exit $rc
