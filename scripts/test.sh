#!/usr/bin/env bash
# The test command (README command b, and CI): install everything, including Debian's Chromium
# and ChromeDriver for the browser test of the chat page, then run pytest; then, as root and with
# no arguments, the end-to-end test (scripts/e2e.sh: the whole job as pods in a real one-node
# cluster). KUBETUNE_E2E=0 skips it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromium > /dev/null || ! command -v chromedriver > /dev/null; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -q && $sudo apt-get install -y -q chromium chromium-driver
fi
e2e=0; [ $# -eq 0 ] && [ "$(id -u)" = 0 ] && [ "${KUBETUNE_E2E:-1}" != 0 ] && e2e=1
if [ $e2e = 1 ]; then
  # The end-to-end test's builds (Kueue's manager, both images pushed to their OCI folders) run beside
  # the unit tests at the lowest priority: on 2 cores they take only what the tests leave idle. The
  # control plane is built first, so the tests' fixtures and Kueue's build never build it both at once.
  bash scripts/controlplane.sh > /dev/null
  mkdir -p out
  setsid nice -n 19 bash -c 'bash scripts/controlplane.sh kueue > /dev/null & bash scripts/images.sh build &&
    for image in docker.io/library/kubetune-operator:local docker.io/library/kubetune-trainer:local-cpu; do
      bash scripts/images.sh save "$image" > /dev/null; done; wait' > out/prebuild.log 2>&1 & prebuild=$!
  trap 'kill -- -$prebuild 2> /dev/null || true' EXIT  # its own process group (setsid)
fi
.venv/bin/python -m pytest "$@"
if [ $e2e = 1 ]; then
  wait $prebuild || echo "test: the builds beside the tests failed (out/prebuild.log); scripts/e2e.sh builds again" >&2
  bash scripts/e2e.sh
fi
