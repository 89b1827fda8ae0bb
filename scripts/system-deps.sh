#!/usr/bin/env bash
# Install the system packages some tests need (Chromium for the admin pages' browser test, HAProxy
# in front of the fan-out nodes), when their binary is missing (idempotent).
# One "binary:package" pair a line; apt-get runs only as root and only for what is missing.
set -euo pipefail
DEPS=(
  /usr/bin/chromium:chromium
  /usr/bin/chromedriver:chromium-driver
  /usr/sbin/haproxy:haproxy
)
missing=()
for pair in "${DEPS[@]}"; do
  binary=${pair%%:*}
  package=${pair#*:}
  [ -x "$binary" ] || missing+=("$package")
done
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "system-deps: missing packages: ${missing[*]}" >&2
  echo "system-deps: not root, so not installing them; run: sudo apt-get install -y ${missing[*]}" >&2
  exit 0
fi
echo "system-deps: installing ${missing[*]}"
apt-get update -q
DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
