# nix/npm-deps.sh as a fixed-output derivation of real Nix, without nixpkgs: the same script, with
# this machine's npm (the build runs unsandboxed), and Nix itself checks the NAR hash of what it
# makes against `hash` (scripts/check-package.sh passes the one in nix/package.nix).
{ src, hash }:
derivation {
  name = "snapback-npm-deps";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [
    "-c"
    "sh ${src}/nix/npm-deps.sh ${src} $out"
  ];
  PATH = builtins.getEnv "PATH";
  outputHashMode = "recursive";
  outputHashAlgo = "sha256";
  outputHash = hash;
}
