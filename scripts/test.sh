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
.venv/bin/python -m pytest "$@"
if [ $# -eq 0 ] && [ "$(id -u)" = 0 ] && [ "${KUBETUNE_E2E:-1}" != 0 ]; then
  bash scripts/e2e.sh
fi
