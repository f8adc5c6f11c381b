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
  typescript,
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
      ../tsconfig.json
      ../tsconfig.build.json
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
  nativeBuildInputs = [ makeWrapper pkg-config python3 typescript ];
  buildInputs = [ systemdMinimal ];
  dontNpmBuild = true;
  # Compiled JavaScript (dist/, which bin/ prefers) starts faster and takes about 25 MiB less
  # memory per agent than stripping types at run time (npm run bench). nixpkgs' tsc (5.8 or newer)
  # reads the same tsconfig as the TypeScript 7 used in development.
  buildPhase = ''
    runHook preBuild
    npm rebuild sd-notify --ignore-scripts=false --nodedir=${nodejs_24}
    tsc -p tsconfig.build.json
    runHook postBuild
  '';

  installPhase = ''
    runHook preInstall
    npm prune --omit=dev --ignore-scripts --no-save
    mkdir -p $out/share/snapback $out/bin
    cp -r package.json bin dist node_modules $out/share/snapback/
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
