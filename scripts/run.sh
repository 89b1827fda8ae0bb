#!/usr/bin/env bash
# Install skyrelay into .venv and run the relay on SQLite under ./data (extra args go to `serve`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/dev-env.sh
exec .venv/bin/skyrelay serve "$@"
