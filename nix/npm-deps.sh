#!/bin/sh
# The production dependencies, installed by npm itself from package-lock.json: the one step of the
# package that needs the network. nix/package.nix runs it as a fixed-output derivation; CI runs the
# same script and checks its NAR hash against the one in nix/package.nix (scripts/npm-deps-hash.sh).
#
#   nix/npm-deps.sh SRC OUT    SRC holds package.json and package-lock.json; OUT/node_modules is made
#
# npm knows its registry, so no registry host name is written anywhere. What makes the output the
# same on every machine and every run: `npm ci` installs exactly the lockfile; `--omit=dev` leaves
# out the dev tools (and the platform-specific `node` binary); `--ignore-scripts` builds nothing (the
# sd-notify addon is built offline by the package, against its own Node); npm's cache and its
# hidden lockfile (which names this package's version) are not part of the output.
set -eu
src=$1
out=$2
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$src/package.json" "$src/package-lock.json" "$work/"
export HOME="$work/home" npm_config_cache="$work/cache" npm_config_update_notifier=false npm_config_fund=false npm_config_audit=false
cd "$work"
npm ci --omit=dev --ignore-scripts --no-progress --loglevel=error
rm -f node_modules/.package-lock.json
mkdir -p "$out"
mv node_modules "$out/node_modules"
