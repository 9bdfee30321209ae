#!/usr/bin/env bash
# Build Toxiproxy's server (a TCP proxy that injects latency, resets, timeouts, bandwidth limits)
# from its pinned Go module into a cache outside the clone. Does nothing when it is already there.
# Prints the binary's path. Used by benchmarks/bench_storage_faults.py and tests/test_storage_faults.py.
#   KUBETUNE_CACHE  cache root (default ~/.cache/kubetune)
set -euo pipefail
version=v2.12.0
cache="${KUBETUNE_CACHE:-$HOME/.cache/kubetune}"
bin="$cache/bin/toxiproxy-$version"
if [ ! -x "$bin/toxiproxy-server" ]; then
  command -v go > /dev/null || { echo "go is not installed; cannot build toxiproxy" >&2; exit 1; }
  echo "building toxiproxy-server $version (go install; about a minute on 2 cores)" >&2
  mkdir -p "$bin"
  # GOBIN gets the binary named after its package folder: cmd/server -> server
  tmp=$(mktemp -d)
  GOBIN="$tmp" CGO_ENABLED=0 go install -trimpath -ldflags "-s -w" "github.com/Shopify/toxiproxy/v2/cmd/server@$version"
  mv "$tmp/server" "$bin/toxiproxy-server"
  rmdir "$tmp"
fi
echo "$bin/toxiproxy-server"
