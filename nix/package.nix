# Snapback (agent and controller) for nixpkgs' buildNpmPackage.
#
# npmDepsHash cannot be computed on the machines this project is built on (no network beyond the
# npm registry for npm itself); compute it where Nix can fetch, from the repository root:
#   nix run nixpkgs#prefetch-npm-deps package-lock.json
# and replace lib.fakeHash below with its output.
{
  lib,
  buildNpmPackage,
  nodejs_24,
  makeWrapper,
  pkg-config,
  python3,
  systemdMinimal,
  nix,
  systemd,
  util-linux,
}:
buildNpmPackage {
  pname = "snapback";
  version = (lib.importJSON ../package.json).version;
  src = lib.fileset.toSource {
    root = ../.;
    fileset = lib.fileset.unions [
      ../package.json
      ../package-lock.json
      ../bin
      ../agent
      ../controller
      ../shared
      ../scripts/build-addons.js
    ];
  };
  nodejs = nodejs_24;
  npmDepsHash = lib.fakeHash;

  # The `node` dev dependency would download a Node binary in its install script: skip every
  # install script, then build the one native addon (sd-notify, libsystemd) by hand.
  npmRebuildFlags = [ "--ignore-scripts" ];
  nativeBuildInputs = [ makeWrapper pkg-config python3 ];
  buildInputs = [ systemdMinimal ];
  dontNpmBuild = true;
  buildPhase = ''
    runHook preBuild
    npm rebuild sd-notify --ignore-scripts=false --nodedir=${nodejs_24}
    runHook postBuild
  '';

  # Node runs the TypeScript sources directly (type stripping), which it refuses to do under a
  # node_modules directory: install into share/snapback instead of lib/node_modules.
  installPhase = ''
    runHook preInstall
    npm prune --omit=dev --ignore-scripts --no-save
    mkdir -p $out/share/snapback $out/bin
    cp -r package.json bin agent controller shared node_modules $out/share/snapback/
    makeWrapper ${lib.getExe nodejs_24} $out/bin/snapback-agent \
      --add-flags $out/share/snapback/bin/snapback-agent.js \
      --prefix PATH : ${lib.makeBinPath [ nix systemd util-linux ]}
    makeWrapper ${lib.getExe nodejs_24} $out/bin/snapback \
      --add-flags $out/share/snapback/bin/snapback.js \
      --prefix PATH : ${lib.makeBinPath [ nix ]}
    runHook postInstall
  '';

  meta = {
    description = "Commit-confirmed deployments for NixOS: activate a trial, revert on its own unless confirmed";
    license = lib.licenses.mit;
    mainProgram = "snapback";
    platforms = lib.platforms.linux;
  };
}
