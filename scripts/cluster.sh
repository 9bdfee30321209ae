#!/usr/bin/env bash
# A real one-node Kubernetes on this machine, started by hand the way upstream's
# hack/local-up-cluster.sh does it (no systemd): etcd, kube-apiserver (RBAC, PodSecurity),
# kube-controller-manager (all default controllers), kube-scheduler, a kubelet on containerd + runc
# with bridge CNI, kube-proxy (iptables) and CoreDNS for cluster DNS.
#
#   scripts/cluster.sh up       start it (builds missing binaries first); prints the kubeconfig path
#   scripts/cluster.sh down     stop it and remove its pods, network and API state (images are kept)
#   scripts/cluster.sh status   show the processes and the node
#   scripts/cluster.sh load IMAGE         load an image built by scripts/images.sh into the node (if changed)
#   scripts/cluster.sh node-ip            the node's address (pods reach this machine there)
#
# Binaries come from scripts/controlplane.sh (pinned Go modules, cached in ~/.cache/kubetune);
# containerd, runc and the CNI plugins from Debian. Needs root (network namespaces, mounts, iptables).
#   KUBETUNE_CACHE    cache root (default ~/.cache/kubetune); the cluster lives in $KUBETUNE_CACHE/cluster
#   KUBETUNE_NODE_IP  the node's address (default: the address of the default-route interface)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
dir="$cache/cluster"
run=/run/kubetune
sock="$run/containerd.sock"
node=kubetune-node
pod_cidr=10.88.0.0/16
service_cidr=10.96.0.0/16
api_port=6443
log() { echo "cluster: $*" >&2; }
die() { log "$*"; exit 1; }

node_ip() {
  if [ -n "${KUBETUNE_NODE_IP:-}" ]; then echo "$KUBETUNE_NODE_IP"; return; fi
  local dev; dev=$(ip -4 route show default | awk '{print $5; exit}')
  ip -4 -o addr show ${dev:+dev "$dev"} scope global | awk '{split($4, a, "/"); print a[1]; exit}'
}

install_packages() {
  local missing=()
  command -v containerd > /dev/null || missing+=(containerd)
  command -v runc > /dev/null || missing+=(runc)
  [ -x /usr/lib/cni/bridge ] || missing+=(containernetworking-plugins)
  command -v iptables > /dev/null || missing+=(iptables)
  command -v conntrack > /dev/null || missing+=(conntrack)
  command -v openssl > /dev/null || missing+=(openssl)
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]} from Debian"
    apt-get update -q > /dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" > /dev/null
  fi
}

# --- configuration files ----------------------------------------------------------------------
pki() {
  local ip=$1 p="$dir/pki"
  [ -f "$p/apiserver.crt" ] && grep -q "IP:$ip" <(openssl x509 -in "$p/apiserver.crt" -noout -ext subjectAltName 2>/dev/null) && return
  mkdir -p "$p"
  openssl req -x509 -newkey rsa:2048 -nodes -days 3650 -subj "/CN=kubetune-ca" \
    -keyout "$p/ca.key" -out "$p/ca.crt" 2> /dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" -keyout "$p/apiserver.key" -out "$p/apiserver.csr" 2> /dev/null
  printf 'subjectAltName=DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local,DNS:localhost,IP:127.0.0.1,IP:10.96.0.1,IP:%s\n' "$ip" > "$p/san.ext"
  openssl x509 -req -in "$p/apiserver.csr" -CA "$p/ca.crt" -CAkey "$p/ca.key" -CAcreateserial -days 3650 \
    -extfile "$p/san.ext" -out "$p/apiserver.crt" 2> /dev/null
  openssl genrsa -out "$p/sa.key" 2048 2> /dev/null
  openssl rsa -in "$p/sa.key" -pubout -out "$p/sa.pub" 2> /dev/null
}

kubeconfig() {  # admin kubeconfig: a static token in system:masters (the one cluster-admin user)
  local ip=$1 token
  [ -f "$dir/token" ] || openssl rand -hex 16 > "$dir/token"
  token=$(cat "$dir/token")
  echo "$token,admin,admin,\"system:masters\"" > "$dir/tokens.csv"
  cat > "$dir/kubeconfig" <<EOF
apiVersion: v1
kind: Config
current-context: kubetune
clusters:
- name: kubetune
  cluster: {server: "https://$ip:$api_port", certificate-authority: "$dir/pki/ca.crt"}
users:
- name: admin
  user: {token: "$token"}
contexts:
- name: kubetune
  context: {cluster: kubetune, user: admin}
EOF
}

runtime_config() {
  local ip=$1
  mkdir -p "$dir/cni" "$run"
  # restrict_oom_score_adj: root here lacks CAP_SYS_RESOURCE, and runc fails to raise oom_score_adj.
  cat > "$dir/containerd.toml" <<EOF
version = 2
root = "$dir/containerd"
state = "$run/containerd"
[grpc]
  address = "$sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:kubetune"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$dir/cni"
EOF
  cat > "$dir/cni/10-kubetune.conflist" <<EOF
{"cniVersion": "1.0.0", "name": "kubetune", "plugins": [
  {"type": "bridge", "bridge": "kubetune0", "isGateway": true, "ipMasq": true, "hairpinMode": true,
   "ipam": {"type": "host-local", "ranges": [[{"subnet": "$pod_cidr"}]], "routes": [{"dst": "0.0.0.0/0"}]}},
  {"type": "portmap", "capabilities": {"portMappings": true}}]}
EOF
  # The host is cgroup v1 ("hybrid"): no QoS cgroups, cgroupfs driver. Image GC off: the images are
  # imported here, not pullable. DNS: CoreDNS on the node's address.
  cat > "$dir/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupsPerQOS: false
enforceNodeAllocatable: []
failSwapOn: false
containerRuntimeEndpoint: unix://$sock
authentication: {anonymous: {enabled: true}, webhook: {enabled: false}}
authorization: {mode: AlwaysAllow}
clusterDNS: ["$ip"]
clusterDomain: cluster.local
address: "$ip"
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard: {memory.available: 100Mi, nodefs.available: 1%, imagefs.available: 1%}
EOF
  cat > "$dir/Corefile" <<EOF
.:53 {
    bind $ip
    errors
    health 127.0.0.1:18080
    ready 127.0.0.1:18181
    kubernetes cluster.local in-addr.arpa ip6.arpa {
        kubeconfig $dir/kubeconfig
        pods insecure
        fallthrough in-addr.arpa ip6.arpa
    }
    cache 5
}
EOF
}

# --- processes ----------------------------------------------------------------------------------
start() {  # start NAME BINARY ARGS...: in the background, log and pid under $dir
  local name=$1; shift
  mkdir -p "$dir/logs" "$dir/pids"
  setsid "$@" > "$dir/logs/$name.log" 2>&1 < /dev/null &
  echo $! > "$dir/pids/$name.pid"
}

running() {  # the pid file names a live process of that program (pids are reused after a reboot)
  local pid; pid=$(cat "$dir/pids/$1.pid" 2> /dev/null) || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" 2> /dev/null | grep -q "$1"
}

wait_for() {  # wait_for WHAT SECONDS COMMAND...: bounded, says what it waits for
  local what=$1 limit=$2 i; shift 2
  for ((i = 0; i < limit * 2; i++)); do
    "$@" > /dev/null 2>&1 && return 0
    sleep 0.5
  done
  die "$what not ready after ${limit}s; logs in $dir/logs"
}

up() {
  [ "$(id -u)" = 0 ] || die "needs root (network namespaces, mounts, iptables)"
  running kube-apiserver && { log "already up"; echo "$dir/kubeconfig"; return; }
  [ -d "$dir/pids" ] && down  # what a killed or rebooted cluster left: pods, mounts, network, rules
  install_packages
  local bin ip; bin=$(bash "$root/scripts/controlplane.sh" node)
  ip=$(node_ip); [ -n "$ip" ] || die "no node address found; set KUBETUNE_NODE_IP"
  log "node $node at $ip, binaries in $bin"
  mkdir -p "$dir"; rm -rf "$dir/etcd" "$dir/logs"
  pki "$ip"; kubeconfig "$ip"; runtime_config "$ip"
  # Pods on the bridge reach Services through iptables; their traffic must pass it.
  modprobe br_netfilter 2> /dev/null || true
  sysctl -qw net.ipv4.ip_forward=1 net.bridge.bridge-nf-call-iptables=1 || true

  start etcd "$bin/etcd" --name=default --data-dir="$dir/etcd" --unsafe-no-fsync --log-level=error \
    --listen-client-urls=http://127.0.0.1:2379 --advertise-client-urls=http://127.0.0.1:2379 \
    --listen-peer-urls=http://127.0.0.1:2380 --initial-advertise-peer-urls=http://127.0.0.1:2380 \
    --initial-cluster=default=http://127.0.0.1:2380
  start kube-apiserver "$bin/kube-apiserver" --etcd-servers=http://127.0.0.1:2379 \
    --bind-address=0.0.0.0 --advertise-address="$ip" --secure-port=$api_port \
    --tls-cert-file="$dir/pki/apiserver.crt" --tls-private-key-file="$dir/pki/apiserver.key" \
    --client-ca-file="$dir/pki/ca.crt" --token-auth-file="$dir/tokens.csv" \
    --authorization-mode=Node,RBAC --enable-admission-plugins=NodeRestriction \
    --service-account-issuer=https://kubernetes.default.svc.cluster.local \
    --service-account-key-file="$dir/pki/sa.pub" --service-account-signing-key-file="$dir/pki/sa.key" \
    --service-cluster-ip-range=$service_cidr --kubelet-preferred-address-types=InternalIP \
    --allow-privileged=true --v=1
  wait_for kube-apiserver 120 "$bin/kubectl" --kubeconfig "$dir/kubeconfig" get --raw /readyz
  start kube-controller-manager "$bin/kube-controller-manager" --kubeconfig="$dir/kubeconfig" \
    --leader-elect=false --bind-address=127.0.0.1 --secure-port=10257 \
    --root-ca-file="$dir/pki/ca.crt" --service-account-private-key-file="$dir/pki/sa.key" \
    --use-service-account-credentials=true --cluster-signing-cert-file="$dir/pki/ca.crt" \
    --cluster-signing-key-file="$dir/pki/ca.key" --v=1
  start kube-scheduler "$bin/kube-scheduler" --kubeconfig="$dir/kubeconfig" --leader-elect=false \
    --bind-address=127.0.0.1 --secure-port=10259
  start containerd containerd --config "$dir/containerd.toml"
  wait_for containerd 30 test -S "$sock"
  ensure_pause
  start kubelet "$bin/kubelet" --config="$dir/kubelet.yaml" --kubeconfig="$dir/kubeconfig" \
    --root-dir="$dir/kubelet" --cert-dir="$dir/pki/kubelet" --hostname-override=$node --node-ip="$ip" --v=1
  start kube-proxy "$bin/kube-proxy" --kubeconfig="$dir/kubeconfig" --hostname-override=$node \
    --proxy-mode=iptables --cluster-cidr=$pod_cidr --conntrack-max-per-core=0 \
    --metrics-bind-address=127.0.0.1:10249 --healthz-bind-address=127.0.0.1:10256
  start coredns "$bin/coredns" -conf "$dir/Corefile"
  wait_for "node $node" 120 "$bin/kubectl" --kubeconfig "$dir/kubeconfig" wait --for=condition=Ready "node/$node" --timeout=1s
  wait_for "default ServiceAccount" 60 "$bin/kubectl" --kubeconfig "$dir/kubeconfig" get serviceaccount default
  wait_for coredns 30 curl -sf http://127.0.0.1:18181/ready
  log "up: export KUBECONFIG=$dir/kubeconfig PATH=$bin:\$PATH"
  echo "$dir/kubeconfig"
}

ensure_pause() {  # the pod sandbox image: the pause binary in an image of its own, imported when missing
  if ! ctr --address "$sock" -n k8s.io images ls -q | grep -qx "registry.k8s.io/pause:kubetune"; then
    bash "$root/scripts/images.sh" pause | import
  fi
}

import() {  # an image archive on stdin (docker-archive or OCI) into the node's containerd
  ctr --address "$sock" -n k8s.io images import --all-platforms - > /dev/null
}

load() {  # a buildah image into the node, unless this very image (by ID) was loaded before
  local id mark="$dir/loaded/${1//[\/:]/_}"
  id=$(buildah inspect --type image --format '{{.FromImageID}}' "$1")
  if [ "$(cat "$mark" 2> /dev/null)" = "$id" ] && ctr --address "$sock" -n k8s.io images ls -q | grep -qx "$1"; then
    return
  fi
  log "loading $1 into the node"
  bash "$root/scripts/images.sh" save "$1" | import
  mkdir -p "$dir/loaded" && echo "$id" > "$mark"
  ensure_pause  # once, a run found it gone after the images were loaded (cause not found): pods never started
}

down() {
  local name pid
  [ -d "$dir/pids" ] || { log "not running"; return; }
  # The kubelet first, so it starts no new pods; then every pod's containers and sandboxes.
  # Kueue's manager too, if scripts/kueue.sh started it (it talks to this API server only).
  for name in kueue kubelet kube-proxy coredns kube-scheduler kube-controller-manager; do stop "$name"; done
  if running containerd; then
    local ns=k8s.io ids
    ids=$(ctr --address "$sock" -n $ns tasks ls -q 2> /dev/null || true)
    for pid in $ids; do ctr --address "$sock" -n $ns tasks kill -s KILL "$pid" > /dev/null 2>&1 || true; done
    sleep 1
    for pid in $ids; do ctr --address "$sock" -n $ns tasks delete -f "$pid" > /dev/null 2>&1 || true; done
    ctr --address "$sock" -n $ns containers ls -q 2> /dev/null | xargs -r ctr --address "$sock" -n $ns containers rm > /dev/null 2>&1 || true
  fi
  stop containerd; stop kube-apiserver; stop etcd
  pkill -f "containerd-shim-runc-v2 -namespace k8s.io -id .* -address $sock" 2> /dev/null || true
  # Mounts the kubelet and containerd leave (volumes, rootfs, netns), deepest first.
  grep -E " ($dir/kubelet|$run)" /proc/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l 2> /dev/null || true
  ip link del kubetune0 2> /dev/null || true
  if [ -x "$(bash "$root/scripts/controlplane.sh" node 2> /dev/null)/kube-proxy" ]; then
    "$(bash "$root/scripts/controlplane.sh" node)/kube-proxy" --cleanup > /dev/null 2>&1 || true
  fi
  rm -rf "$dir/etcd" "$dir/kubelet" "$dir/pids" "$run"
  log "down"
}

stop() {
  local pid
  running "$1" || return 0
  pid=$(cat "$dir/pids/$1.pid")
  kill -TERM -- "-$pid" 2> /dev/null || kill -TERM "$pid" 2> /dev/null || true
  for _ in $(seq 20); do kill -0 "$pid" 2> /dev/null || return 0; sleep 0.5; done
  kill -KILL -- "-$pid" 2> /dev/null || true
}

status() {
  local name
  for name in etcd kube-apiserver kube-controller-manager kube-scheduler containerd kubelet kube-proxy coredns kueue; do
    if running "$name"; then echo "$name: running (pid $(cat "$dir/pids/$name.pid"))"; else echo "$name: stopped"; fi
  done
  running kube-apiserver && "$(bash "$root/scripts/controlplane.sh" node)/kubectl" --kubeconfig "$dir/kubeconfig" get nodes -o wide
}

# Sourced (scripts/kueue.sh), it only defines the functions and paths above.
[ "${BASH_SOURCE[0]}" = "$0" ] || return 0
case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  load) load "$2" ;;
  node-ip) node_ip ;;
  *) echo "usage: $0 up | down | status | load IMAGE | node-ip" >&2; exit 2 ;;
esac
