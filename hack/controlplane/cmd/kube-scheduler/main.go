// kube-scheduler, as upstream's cmd/kube-scheduler/scheduler.go: the node and scheduler of scripts/cluster.sh.
package main

import (
	"k8s.io/kubernetes/cmd/kube-scheduler/app"
	"kubetune.dev/hack/controlplane/internal/component"
)

func main() {
	component.Run(app.NewSchedulerCommand())
}
