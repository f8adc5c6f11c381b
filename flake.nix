{
  description = "Snapback: commit-confirmed deployments for NixOS";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
    in
    {
      packages = forAllSystems (pkgs: rec {
        snapback = pkgs.callPackage ./nix/package.nix { };
        default = snapback;
      });

      apps = forAllSystems (pkgs: {
        default = {
          type = "app";
          program = "${self.packages.${pkgs.stdenv.hostPlatform.system}.default}/bin/snapback";
        };
      });

      overlays.default = final: prev: { snapback = final.callPackage ./nix/package.nix { }; };

      nixosModules.default = { lib, pkgs, ... }: {
        # Named in the module system's messages (a function has no file of its own).
        _file = "${toString ./flake.nix}#nixosModules.default";
        imports = [ ./nixos-module ];
        services.snapback.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
      };

      # The RFC 166 formatter; `nixfmt-rfc-style` is now a deprecated alias of it.
      formatter = forAllSystems (pkgs: pkgs.nixfmt);
    };
}
