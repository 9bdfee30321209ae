// kube-apiserver, as upstream's cmd/kube-apiserver/apiserver.go.
package main

import (
	"k8s.io/kubernetes/cmd/kube-apiserver/app"
	"kubetune.dev/hack/controlplane/internal/component"
)

func main() {
	component.Run(app.NewAPIServerCommand())
}
