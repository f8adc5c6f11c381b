# The host side of the README's NixOS recipe, as a module of its own: add it (with example.nix
# beside it) and `snapback.nixosModules.default` to the host's `modules`. CI evaluates exactly this
# file with nixpkgs' lib (test/module.test.ts), and checks that the README shows it unchanged.
{
  services.snapback = {
    enable = true;
    # Opens settings.listen.port (7731). Better: open it only on the management interface.
    openFirewall = true;
    # Operators: by default root's users.users.root.openssh.authorizedKeys.keys and .keyFiles.
    settings = import ./example.nix;
  };
}
