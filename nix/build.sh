#!/bin/sh
# The package's build, offline: the sd-notify addon against libsystemd and the given Node's
# headers, then the TypeScript (compiled, not type-checked: `npm run check` does that), then the
# tree that gets installed. nix/package.nix runs it; CI runs it too (scripts/check-package.sh).
#
#   nix/build.sh SRC DEPS NODEDIR OUT
#     SRC      the source tree
#     DEPS     the node_modules that nix/npm-deps.sh made
#     NODEDIR  the Node whose headers the addon is built against (its include/node/node.h)
#     OUT      gets package.json, bin/, dist/ and node_modules/
#
# Needs node, npm (for the node-gyp it carries), tsc, python3, make, a C++ compiler, pkg-config and
# libsystemd's headers.
set -eu
src=$1
deps=$2
nodedir=$3
out=$4
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
for f in package.json package-lock.json tsconfig.json tsconfig.build.json bin agent controller shared; do
  cp -R "$src/$f" "$work/"
done
cp -R "$deps" "$work/node_modules"
chmod -R u+w "$work"
cd "$work"
export HOME="$work/home" npm_config_update_notifier=false

# The addon, built by npm's own node-gyp against NODEDIR (nothing is downloaded). Its build/
# directory keeps the compiler's command lines and the header paths; only the module itself stays.
npm rebuild sd-notify --ignore-scripts=false --nodedir="$nodedir" --loglevel=error
addon=node_modules/sd-notify/build
test -f "$addon/Release/notify.node"
find "$addon" -mindepth 1 -maxdepth 1 ! -name Release -exec rm -rf {} +
find "$addon/Release" -mindepth 1 ! -name notify.node -exec rm -rf {} +

tsc -p tsconfig.build.json

mkdir -p "$out"
cp -R package.json bin dist node_modules "$out/"
