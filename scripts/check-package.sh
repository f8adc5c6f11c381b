#!/usr/bin/env bash
# The Nix package's two build steps, run as nix/package.nix runs them, outside Nix (CI has npm's
# registry; these machines have no nixpkgs):
#   1. nix/npm-deps.sh, whose NAR hash must equal the outputHash in nix/package.nix: a dependency
#      change without a hash update cannot land. `--update` writes the new hash instead of failing.
#   2. nix/build.sh, offline, against this project's Node 24 and tsc; the tree it makes must run.
set -euo pipefail
cd "$(dirname "$0")/.."
export NIX_CONFIG=$'sandbox = false\nbuild-users-group =\nsubstituters =\nexperimental-features = nix-command'
node=node_modules/.bin/node
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

sh nix/npm-deps.sh . "$work/deps"
got=$(nix hash to-sri --type sha256 "$(nix-hash --type sha256 --base32 "$work/deps")")
want=$(sed -n 's/^ *outputHash = "\(sha256-[^"]*\)";.*/\1/p' nix/package.nix)
if [ "$got" != "$want" ]; then
  if [ "${1:-}" = --update ]; then
    sed -i "s|outputHash = \"$want\";|outputHash = \"$got\";|" nix/package.nix
    echo "check-package: nix/package.nix: outputHash updated to $got"
  else
    echo "check-package: nix/package.nix says outputHash = \"$want\", but the dependencies hash to \"$got\"." >&2
    echo "check-package: after changing dependencies, run scripts/check-package.sh --update and commit nix/package.nix." >&2
    exit 1
  fi
else
  echo "check-package: the dependencies hash to $got, as nix/package.nix says"
fi

# Nix agrees: the script as a fixed-output derivation, whose output Nix checks against that hash
# (--check builds it again even when an earlier run left it in the store).
src=$(mktemp -d)
mkdir "$src/nix" && cp package.json package-lock.json "$src/" && cp nix/npm-deps.sh "$src/nix/"
args=(--no-out-link scripts/npm-deps-fod.nix --arg src "$src" --argstr hash "$(sed -n 's/^ *outputHash = "\(sha256-[^"]*\)";.*/\1/p' nix/package.nix)")
nix-build "${args[@]}" >/dev/null
nix-build --check "${args[@]}" >/dev/null
rm -rf "$src"
echo "check-package: Nix builds the same dependencies as a fixed-output derivation with that hash"

nodedir=$("$node" -p "require('path').resolve('node_modules/node/node_modules', 'node-' + process.platform + '-' + process.arch)")
PATH="$PWD/node_modules/.bin:$PATH" sh nix/build.sh . "$work/deps/node_modules" "$nodedir" "$work/tree"
version=$("$node" -p "require('./package.json').version")
test "$("$node" "$work/tree/bin/snapback-agent.js" --version)" = "$version"
test -f "$work/tree/dist/agent/cli.js"
(cd "$work/tree" && "$OLDPWD/$node" -e "require('sd-notify')")
if grep -rlI -e "$PWD" -e /usr/include "$work/tree/node_modules/sd-notify"; then
  echo "check-package: the addon's build directory keeps build paths (above)" >&2
  exit 1
fi
echo "check-package: the built tree runs (snapback-agent $version, compiled, with the sd-notify addon)"
