// kube-proxy, as upstream's cmd/kube-proxy/proxy.go: the node and scheduler of scripts/cluster.sh.
package main

import (
	"k8s.io/kubernetes/cmd/kube-proxy/app"
	"kubetune.dev/hack/controlplane/internal/component"
)

func main() {
	component.Run(app.NewProxyCommand())
}
