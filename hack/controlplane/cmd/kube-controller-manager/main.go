// kube-controller-manager, as upstream's cmd/kube-controller-manager/controller-manager.go.
// Tests run only its garbage collector, so deleting a FineTuneJob really removes its children.
package main

import (
	"k8s.io/kubernetes/cmd/kube-controller-manager/app"
	"kubetune.dev/hack/controlplane/internal/component"
)

func main() {
	component.Run(app.NewControllerManagerCommand())
}
