// kubelet, as upstream's cmd/kubelet/kubelet.go: the node and scheduler of scripts/cluster.sh.
package main

import (
	"context"

	"k8s.io/kubernetes/cmd/kubelet/app"
	"kubetune.dev/hack/controlplane/internal/component"
)

func main() {
	component.Run(app.NewKubeletCommand(context.Background()))
}
