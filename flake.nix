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
        imports = [ ./nixos-module ];
        services.snapback.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.default;
      };

      formatter = forAllSystems (pkgs: pkgs.nixfmt-rfc-style);
    };
}
