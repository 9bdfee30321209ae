#!/usr/bin/env bash
# The test command (README command b, and CI): install everything, including Debian's Chromium
# and ChromeDriver for the browser test of the chat page, then run pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
if ! command -v chromium > /dev/null || ! command -v chromedriver > /dev/null; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -q && $sudo apt-get install -y -q chromium chromium-driver
fi
exec .venv/bin/python -m pytest "$@"
