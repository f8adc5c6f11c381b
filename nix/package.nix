# Snapback (agent and controller), built without naming any registry.
#
# nixpkgs' npm fetchers (fetchNpmDeps, importNpmLock) read the download address of every package
# from package-lock.json; this project's lockfile has none, on purpose. So the one step that needs
# the network is a fixed-output derivation in which npm itself installs the production dependencies
# from the lockfile (nix/npm-deps.sh); everything after it is offline (nix/build.sh). CI runs the
# same two scripts and fails when the hash below does not match (scripts/check-package.sh);
# after a dependency change, `scripts/check-package.sh --update` writes the new one.
{
  lib,
  stdenv,
  stdenvNoCC,
  nodejs_24,
  typescript,
  cacert,
  makeWrapper,
  pkg-config,
  python3,
  systemdMinimal,
  nix,
  systemd,
  util-linux,
}:
let
  version = (lib.importJSON ../package.json).version;

  # Only the named files and directories of the repository (paths relative to its root), so that
  # nothing else changes the derivations; builtins.path keeps this evaluable by Nix 2.8 too.
  sourceOf =
    name: entries:
    builtins.path {
      inherit name;
      path = ../.;
      filter =
        path: _type:
        let
          rel = lib.removePrefix (toString ../. + "/") (toString path);
        in
        lib.any (e: rel == e || lib.hasPrefix (e + "/") rel || lib.hasPrefix (rel + "/") e) entries;
    };

  npmDeps = stdenvNoCC.mkDerivation {
    pname = "snapback-npm-deps";
    inherit version;
    src = sourceOf "snapback-npm-deps-source" [
      "package.json"
      "package-lock.json"
      "nix/npm-deps.sh"
    ];
    nativeBuildInputs = [ nodejs_24 ];
    buildPhase = ''
      runHook preBuild
      sh nix/npm-deps.sh . $out
      runHook postBuild
    '';
    dontInstall = true;
    # Patching shebangs or stripping would make the output depend on this machine's store paths.
    dontFixup = true;
    SSL_CERT_FILE = "${cacert}/etc/ssl/certs/ca-bundle.crt";
    impureEnvVars = lib.fetchers.proxyImpureEnvVars;
    outputHashMode = "recursive";
    outputHashAlgo = "sha256";
    outputHash = "sha256-aJStD3kAeRfEDG2uogtn/fM6pw6k/kAk5GazmVxESVU=";
  };
in
stdenv.mkDerivation {
  pname = "snapback";
  inherit version;
  src = sourceOf "snapback-source" [
    "package.json"
    "package-lock.json"
    "tsconfig.json"
    "tsconfig.build.json"
    "bin"
    "agent"
    "controller"
    "shared"
    "nix/build.sh"
  ];

  nativeBuildInputs = [
    nodejs_24
    typescript
    makeWrapper
    pkg-config
    python3
  ];
  buildInputs = [ systemdMinimal ];

  # The sd-notify addon against libsystemd and this Node's headers; the TypeScript compiled by
  # nixpkgs' tsc (5.8 or newer reads the tsconfig; the build config does not type-check). Compiled
  # JavaScript (dist/, which bin/ prefers) starts faster and takes less memory than stripping types
  # at run time (npm run bench).
  buildPhase = ''
    runHook preBuild
    sh nix/build.sh . ${npmDeps}/node_modules ${nodejs_24} tree
    runHook postBuild
  '';

  # --suffix: the PATH of the unit (on NixOS the module's `path`, with the system's own Nix) comes
  # first; these are only the fallback for running the commands by hand.
  installPhase = ''
    runHook preInstall
    mkdir -p $out/share $out/bin
    cp -R tree $out/share/snapback
    makeWrapper ${lib.getExe nodejs_24} $out/bin/snapback-agent \
      --add-flags $out/share/snapback/bin/snapback-agent.js \
      --set-default NODE_ENV production \
      --suffix PATH : ${
        lib.makeBinPath [
          nix
          systemd
          util-linux
        ]
      }
    makeWrapper ${lib.getExe nodejs_24} $out/bin/snapback \
      --add-flags $out/share/snapback/bin/snapback.js \
      --suffix PATH : ${lib.makeBinPath [ nix ]}
    runHook postInstall
  '';

  passthru = { inherit npmDeps; };

  meta = {
    description = "Commit-confirmed deployments for NixOS: activate a trial, revert on its own unless confirmed";
    license = lib.licenses.mit;
    mainProgram = "snapback";
    platforms = lib.platforms.linux;
  };
}
