#!/usr/bin/env bash
# System packages the tests need besides Python ones: HAProxy (the fan-out tests put it in front of
# two `skyrelay fanout` nodes). Idempotent: installs only what is missing, with apt-get, and only as
# root; otherwise it says what to install and carries on (the tests that need it then fail clearly).
set -euo pipefail
missing=()
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || missing+=(haproxy)
if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "system-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
  echo "system-deps: missing ${missing[*]}: install it (Debian/Ubuntu: sudo apt-get install ${missing[*]})" >&2
fi
