#!/usr/bin/env bash
# Kueue (sigs.k8s.io/kueue, pinned in hack/kueue/go.mod, built from source by scripts/controlplane.sh)
# on the running one-node cluster of scripts/cluster.sh: its CRDs and webhook configurations taken
# from the module's own config/, its manager as a host process next to the cluster's (with the admin
# kubeconfig, so no RBAC), and the queues of hack/kueue/queues.yaml.
#
#   scripts/kueue.sh up [NS_A NS_B]   install and start it; LocalQueue team-a in NS_A, team-b in NS_B
#                                     (default namespaces team-a and team-b; created when missing)
#   scripts/kueue.sh down             stop the manager, remove its webhooks, CRDs (and with them every
#                                     Kueue object) and kueue-system; scripts/cluster.sh down also stops it
#   scripts/kueue.sh status
#
#   KUEUE_TEAM_A_CPU          team-a's nominal CPU, never exceeded (default 1: one small job's pod at a time)
#   KUEUE_TEAM_B_CPU          team-b's nominal CPU; it borrows the rest from team-a (default 500m)
#   KUEUE_TEAM_MEMORY         nominal memory of each ClusterQueue (default 4Gi)
#   KUEUE_PODS_READY_TIMEOUT  how long an admitted Job may take until all its pods are Ready, else
#                             Kueue suspends and requeues it (waitForPodsReady; default 5m)
#
# Only batch/v1 Jobs labelled kueue.x-k8s.io/queue-name are queued; unlabelled Jobs run as before.
# While Kueue is installed every Job creation passes its webhook: with the manager stopped (but not
# `down`), creating a Job fails.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
source "$root/scripts/cluster.sh"  # $dir, node_ip, start, running, stop, wait_for
log() { echo "kueue: $*" >&2; }

ns=kueue-system
service=kueue-webhook-service      # the cert rotator derives the webhook configurations' names from it:
secret=kueue-webhook-server-cert   # kueue-{validating,mutating}-webhook-configuration
webhook_port=9443
health=127.0.0.1:18083             # not 8081/8443/8082 (Kueue's defaults); clear of cluster.sh's ports
metrics=127.0.0.1:18443
kdir="$dir/kueue"
# The CRDs Kueue converts between v1beta1 and v1beta2 with its webhook (its config/components/crd patches).
conversion_crds="localqueues clusterqueues cohorts workloads multikueueclusters"

k() { "$bin/kubectl" --kubeconfig "$dir/kubeconfig" "$@"; }

up() {
  [ "$(id -u)" = 0 ] || die "needs root (like scripts/cluster.sh)"
  running kube-apiserver || die "the cluster is not running: scripts/cluster.sh up"
  bin=$(bash "$root/scripts/controlplane.sh" kueue)
  local version src ip
  version=$(awk '$1 == "sigs.k8s.io/kueue" {print $2}' "$root/hack/kueue/go.mod")
  src=$(cd "$root/hack/kueue" && go list -m -f '{{.Dir}}' sigs.k8s.io/kueue)
  ip=$(node_ip)
  if running kueue; then
    log "already up"
  else
    log "Kueue $version from $src"
    install "$src" "$ip"
    manager "$bin/kueue-$version" "$ip"
  fi
  queues "${1:-team-a}" "${2:-team-b}"
  log "up: manager log $dir/logs/kueue.log"
}

install() {  # install MODULE_DIR NODE_IP: CRDs, namespace, webhook Service and configurations
  local src=$1 ip=$2 crd
  # Server-side: the Workload CRD is too large for client-side apply's last-applied annotation.
  k apply --server-side --force-conflicts -f "$src/config/components/crd/bases" > /dev/null
  for crd in $conversion_crds; do
    k patch crd "$crd.kueue.x-k8s.io" --type merge -p "{\"spec\": {\"conversion\": {\"strategy\": \"Webhook\",
      \"webhook\": {\"conversionReviewVersions\": [\"v1\"], \"clientConfig\": {\"service\":
      {\"namespace\": \"$ns\", \"name\": \"$service\", \"path\": \"/convert\"}}}}}}" > /dev/null
  done
  k create namespace $ns --dry-run=client -o yaml | k apply -f - > /dev/null
  # The rotator fills this Secret in; it must exist first. In a pod the kubelet would then mount it
  # as the cert dir; here certs() copies it there.
  k -n $ns create secret generic $secret --dry-run=client -o yaml | k apply -f - > /dev/null
  # The manager runs on this machine, not in a pod: a Service without a selector whose one endpoint
  # is the node's address, where the manager's webhook server listens.
  k apply -f - > /dev/null <<EOF
apiVersion: v1
kind: Service
metadata: {name: $service, namespace: $ns}
spec:
  ports: [{name: https, port: 443, protocol: TCP, targetPort: $webhook_port}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: $service-node
  namespace: $ns
  labels: {kubernetes.io/service-name: $service}
addressType: IPv4
endpoints: [{addresses: ["$ip"], conditions: {ready: true}}]
ports: [{name: https, port: $webhook_port, protocol: TCP}]
EOF
  # Kueue's webhooks, renamed as the rotator expects, pointed at that Service, and only those this
  # setup serves (Kueue's own objects and batch/v1 Jobs): the pod, deployment, ... ones would put
  # every pod creation in the cluster behind the manager for nothing.
  k create --dry-run=client -o json -f "$src/config/components/webhook/manifests.yaml" | jq --arg ns $ns --arg svc $service '
    .metadata.name = "kueue-" + .metadata.name
    | .webhooks |= map(select(.clientConfig.service.path | test("kueue-x-k8s-io|batch-v1-job$"))
      | .clientConfig.service.name = $svc | .clientConfig.service.namespace = $ns)' | k apply -f - > /dev/null
}

manager() {  # manager BINARY NODE_IP: its configuration, then the process; waits until it serves
  local binary=$1 ip=$2 start=$SECONDS
  mkdir -p "$kdir/certs"
  rm -f "$kdir/certs/"*  # certs of an earlier cluster: the rotator makes new ones into the Secret
  cat > "$kdir/config.yaml" <<EOF
apiVersion: config.kueue.x-k8s.io/v1beta2
kind: Configuration
namespace: $ns
health: {healthProbeBindAddress: "$health"}
metrics: {bindAddress: "$metrics"}
webhook: {host: "$ip", port: $webhook_port, certDir: "$kdir/certs"}
leaderElection: {leaderElect: false}  # one manager, like the cluster's controller-manager
internalCertManagement: {enable: true, webhookServiceName: $service, webhookSecretName: $secret}
# All-or-nothing start: an admitted Job whose pods are not all Ready within the timeout is suspended
# and requeued; blockAdmission admits no other workload meanwhile, so two gangs never hold half a
# node each. (v1beta2 has no 'enable': the section being there turns it on.)
waitForPodsReady:
  timeout: ${KUEUE_PODS_READY_TIMEOUT:-5m}
  blockAdmission: true
  requeuingStrategy: {timestamp: Eviction, backoffBaseSeconds: 60, backoffMaxSeconds: 3600}
integrations:
  frameworks: ["batch/job"]
featureGates:
  VisibilityOnDemand: false  # its API server needs an APIService and in-cluster auth; not used here
EOF
  start kueue "$binary" --config="$kdir/config.yaml" --kubeconfig="$dir/kubeconfig" --zap-log-level=info
  wait_for "the webhook certificate in Secret $ns/$secret" 60 secret_filled
  certs
  wait_for "kueue manager" 120 curl -sf "http://$health/readyz"
  wait_for "kueue webhooks" 60 webhooks_answer
  log "manager ready in $((SECONDS - start))s (pid $(cat "$dir/pids/kueue.pid"))"
}

secret_filled() { [ -n "$(k -n $ns get secret $secret -o jsonpath='{.data.tls\.crt}')" ]; }

certs() {  # what the kubelet's Secret volume would do: the rotator's cert and key into the cert dir
  local key
  # Read back once only: the rotator replaces these well before they expire (a year); a cluster lives a day.
  (umask 077
   for key in tls.key tls.crt; do  # the key first: the manager starts serving once tls.crt is there
     k -n $ns get secret $secret -o jsonpath="{.data.${key/./\\.}}" | base64 -d > "$kdir/certs/$key.tmp"
     mv "$kdir/certs/$key.tmp" "$kdir/certs/$key"
   done)
}

webhooks_answer() {  # a dry-run ClusterQueue goes through the validating and mutating webhooks
  k create --dry-run=server -f - <<EOF
apiVersion: kueue.x-k8s.io/v1beta2
kind: ClusterQueue
metadata: {name: kueue-sh-probe}
spec: {namespaceSelector: {}}
EOF
}

queues() {  # queues NS_A NS_B: hack/kueue/queues.yaml with the namespaces and quotas filled in
  local a=$1 b=$2 n
  for n in "$a" "$b"; do k create namespace "$n" --dry-run=client -o yaml | k apply -f - > /dev/null; done
  sed -e "s/@TEAM_A_NAMESPACE@/$a/g" -e "s/@TEAM_B_NAMESPACE@/$b/g" \
    -e "s/@TEAM_A_CPU@/${KUEUE_TEAM_A_CPU:-1}/g" -e "s/@TEAM_B_CPU@/${KUEUE_TEAM_B_CPU:-500m}/g" \
    -e "s/@TEAM_MEMORY@/${KUEUE_TEAM_MEMORY:-4Gi}/g" \
    "$root/hack/kueue/queues.yaml" | k apply -f - > /dev/null
  log "queues: ClusterQueues team-a (${KUEUE_TEAM_A_CPU:-1} CPU), team-b (${KUEUE_TEAM_B_CPU:-500m} CPU, borrows)," \
    "${KUEUE_TEAM_MEMORY:-4Gi} each, cohort kubetune; LocalQueues $a/team-a, $b/team-b; priorities low, high"
}

down() {
  bin=$(bash "$root/scripts/controlplane.sh" kueue)
  stop kueue
  rm -f "$dir/pids/kueue.pid"
  rm -rf "$kdir/certs"
  if running kube-apiserver; then
    # The webhooks first: without the manager they would refuse every Job creation.
    k delete validatingwebhookconfiguration kueue-validating-webhook-configuration --ignore-not-found > /dev/null
    k delete mutatingwebhookconfiguration kueue-mutating-webhook-configuration --ignore-not-found > /dev/null
    # Kueue's finalizers (ClusterQueues, ResourceFlavors, Workloads in use) are the stopped
    # manager's to remove: dropped here, else deleting the CRDs waits for them forever.
    local crd
    for crd in $(k get crd -o name | grep '\.kueue\.x-k8s\.io$'); do
      drop_finalizers "${crd#*/}"
      k delete "$crd" --wait=false > /dev/null
    done
    wait_for "Kueue's CRDs gone" 60 no_crds
    k delete namespace $ns --ignore-not-found > /dev/null
  fi
  log "down"
}

drop_finalizers() {  # drop_finalizers RESOURCE: of all its objects that have any
  local obj namespace
  for obj in $(k get "$1" -A -o jsonpath='{range .items[?(@.metadata.finalizers)]}{.metadata.namespace}/{.metadata.name}{" "}{end}'); do
    namespace=${obj%%/*}
    k patch "$1" "${obj#*/}" ${namespace:+-n "$namespace"} --type merge -p '{"metadata": {"finalizers": null}}' > /dev/null
  done
}

no_crds() { [ -z "$(k get crd -o name | grep '\.kueue\.x-k8s\.io$')" ]; }

status() {
  bin=$(bash "$root/scripts/controlplane.sh" kueue)
  if running kueue; then echo "kueue: running (pid $(cat "$dir/pids/kueue.pid"))"; else echo "kueue: stopped"; fi
  running kube-apiserver && k get clusterqueues,localqueues -A 2> /dev/null || true
}

case "${1:-}" in
  up) shift; up "$@" ;;
  down) down ;;
  status) status ;;
  *) echo "usage: $0 up [NS_A NS_B] | down | status" >&2; exit 2 ;;
esac
