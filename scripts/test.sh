#!/usr/bin/env bash
# Install skyrelay (and the reference PDS for interop tests) and run the whole test suite.
# Set TEST_DATABASE_URL=postgresql://... to run the store suites on PostgreSQL as well.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/dev-env.sh
bash scripts/system-deps.sh  # chromium, chromium-driver (admin pages browser test), haproxy (fan-out tests)
if [ -f scripts/refpds/install.sh ]; then
  bash scripts/refpds/install.sh
fi
exec .venv/bin/python -m pytest "$@"
