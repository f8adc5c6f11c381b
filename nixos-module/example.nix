# The example of `services.snapback.settings` (shown in the option's documentation and the README,
# and checked in CI: the agent must accept what the module writes for it).
{
  listen.port = 7731;
  # In addition to the host's own nix.settings.substituters and trusted-public-keys.
  nix.substituters = [ "https://cache.example.org" ];
  nix.trustedPublicKeys = [ "cache.example.org-1:Kz7GzZgP1ZxIBm1yoVEqN4nZ6W7A0bqzH5+9SnxFc3c=" ];
  confirm = {
    defaultTimeoutSec = 120;
    maxTimeoutSec = 1800;
  };
  health = {
    failedUnits = "block";
    checks = [
      { name = "dns"; command = [ "/run/current-system/sw/bin/getent" "hosts" "example.org" ]; timeoutSec = 10; }
    ];
  };
}
