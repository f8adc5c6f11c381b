# The agent configuration the module writes to /etc/snapback/agent.json: the user's `settings`
# over the module's defaults, plus the authorized keys. Plain Nix without nixpkgs' lib, so CI can
# evaluate it with the example below and have the agent validate the result. `metrics` is what the
# module's metrics options make of it (settings.metrics, where given, wins key by key).
{ settings ? { }, authorizedKeys ? [ ], metrics ? { } }:
let
  # Like lib.recursiveUpdate: attribute sets merge, anything else is replaced.
  update = lhs: rhs:
    lhs // builtins.mapAttrs
      (name: value:
        if builtins.isAttrs value && builtins.isAttrs (lhs.${name} or null)
        then update lhs.${name} value
        else value)
      rhs;
  defaults = {
    stateDir = "/var/lib/snapback";
    controlSocket = "/run/snapback/control.sock";
    hostKey = "/etc/ssh/ssh_host_ed25519_key";
    system.runner = "systemd";
  } // (if metrics == { } then { } else { inherit metrics; });
in
update defaults settings // {
  authorizedKeys = authorizedKeys ++ (settings.authorizedKeys or [ ]);
}
