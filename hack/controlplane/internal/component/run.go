// Package component runs a Kubernetes component's cobra command as upstream's mains do, with the
// same log-format and metrics registrations, so each cmd/*/main.go is one line.
package component

import (
	"os"

	"github.com/spf13/cobra"
	"k8s.io/component-base/cli"
	_ "k8s.io/component-base/logs/json/register"          // for JSON log format registration
	_ "k8s.io/component-base/metrics/prometheus/clientgo" // for client metric registration
	_ "k8s.io/component-base/metrics/prometheus/version"  // for version metric registration
)

// Run runs the command and exits with its code.
func Run(command *cobra.Command) {
	os.Exit(cli.Run(command))
}
