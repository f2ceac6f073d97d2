#!/usr/bin/env bash
# Installs everything the test suite needs from a clean clone, then runs it. Exits non-zero on any
# failure, including "no tests ran" (pytest exit code 5).
set -euo pipefail
cd "$(dirname "$0")/.."
# Debian's chromium for the browser test (the test skips, loudly, where this is impossible).
if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the browser test will be skipped" >&2
fi
python3 -m venv .venv
.venv/bin/pip install -q torch==2.14.1 torchvision==0.29.1 -e ".[server,test]"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
