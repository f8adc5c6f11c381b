# services.snapback: the Snapback agent on a NixOS host. It activates new system generations as a
# trial and reverts on its own unless a controller (or the console) confirms them.
{ config, lib, pkgs, ... }:
let
  cfg = config.services.snapback;
  settingsFormat = pkgs.formats.json { };
  agentConfig = import ./settings.nix {
    inherit (cfg) settings authorizedKeys;
    metrics = metricsSettings;
  };

  # The metrics: a listener (metrics.enable) and/or a file for node-exporter's textfile collector.
  nodeExporter = config.services.prometheus.exporters.node;
  defaultTextfileDirectory = "/var/lib/prometheus-node-exporter-text-files";
  textfileDirectory =
    if cfg.metrics.textfile.directory != null then cfg.metrics.textfile.directory else defaultTextfileDirectory;
  metricsSettings =
    lib.optionalAttrs cfg.metrics.enable {
      listen = {
        host = cfg.metrics.listenAddress;
        inherit (cfg.metrics) port;
      };
    }
    // lib.optionalAttrs cfg.metrics.textfile.enable { textfile = "${textfileDirectory}/snapback.prom"; };
  loopback = a: a == "localhost" || a == "::1" || lib.hasPrefix "127." a;

  rootKeys = config.users.users.root.openssh.authorizedKeys;
  # The lines of an authorized_keys file, read at evaluation time as NixOS's sshd module reads
  # keyFiles; blank lines and comments left out as sshd does (the agent refuses empty entries).
  keyFileLines =
    file:
    lib.filter (line: builtins.match "[[:space:]]*(#.*)?" line == null) (
      lib.splitString "\n" (builtins.readFile file)
    );

  # Where the settings hold a Nix path. The JSON type accepts paths, and writing JSON copies each
  # file into the store, readable by every user of the host: `listen.tls.key = ./key.pem` would
  # publish the key. A location on the host is a string; "${./file}" copies a file on purpose.
  pathsIn =
    loc: value:
    if builtins.isPath value then
      [ loc ]
    else if builtins.isAttrs value then
      # A package becomes its store path (outPath), already in the store.
      if value ? outPath then
        pathsIn loc value.outPath
      else
        lib.concatLists (lib.mapAttrsToList (name: pathsIn "${loc}.${lib.strings.escapeNixIdentifier name}") value)
    else if builtins.isList value then
      lib.concatLists (lib.imap0 (i: pathsIn "${loc}[${toString i}]") value)
    else
      [ ];
  settingsPaths = pathsIn "services.snapback.settings" cfg.settings;
  settingsPathsMessage = ''
    ${lib.concatStringsSep ", " settingsPaths} ${if lib.length settingsPaths == 1 then "is a Nix path" else "are Nix paths"}:
    the file would be copied into the world-readable Nix store, where every user of the host can
    read it. Give the file's location on the host as a string instead (e.g.
    "/var/lib/secrets/snapback-key.pem"), or write "''${./file}" for a file that may be public.
  '';

  # The unit's StateDirectory= and RuntimeDirectory= (below), which systemd creates at every start
  # with their modes. The state must outlive restarts (a trial is resumed after the switch that
  # restarts the agent), which /run/snapback does not: systemd empties it when the unit stops. The
  # socket must be where the console can reach it: the unit's /tmp is its own (PrivateTmp), /etc
  # is read-only to it. The unit could follow other settings, but StateDirectory= only names
  # directories below /var/lib, and the plain unit file could not follow at all.
  stateDirectory = "/var/lib/snapback";
  runtimeDirectory = "/run/snapback";
  # toString: a Nix path (refused above) must not be copied into the store by this check either.
  stateDir = toString agentConfig.stateDir;
  controlSocket = toString agentConfig.controlSocket;
  within = dir: p: lib.hasPrefix "${dir}/" p && !(lib.elem ".." (lib.splitString "/" p));

  # Refused rather than written, should anything read it before the assertions are checked.
  configFile =
    if settingsPaths != [ ] then
      throw settingsPathsMessage
    else
      settingsFormat.generate "snapback-agent.json" agentConfig;
in
{
  options.services.snapback = {
    enable = lib.mkEnableOption "the Snapback agent (commit-confirmed system activations)";

    package = lib.mkPackageOption pkgs "snapback" { };

    settings = lib.mkOption {
      description = ''
        Agent configuration, written to {file}`/etc/snapback/agent.json` and validated by the agent
        when it starts (unknown keys are errors). See the README for every key.

        Files are named by their location on the host, as strings: a Nix path (`./key.pem`) is
        refused, since writing the configuration would copy it into the world-readable store.
        `stateDir` stays in {file}`/var/lib/snapback` and `controlSocket` in {file}`/run/snapback`,
        the directories the unit creates.
      '';
      default = { };
      example = lib.literalExpression "import ./example.nix";
      type = lib.types.submodule {
        freeformType = settingsFormat.type;
        options.listen = {
          host = lib.mkOption {
            type = lib.types.str;
            default = "::";
            description = "Address the agent listens on for controllers.";
          };
          port = lib.mkOption {
            type = lib.types.port;
            default = 7731;
            description = "Port the agent listens on for controllers.";
          };
        };
      };
    };

    hardwareWatchdog = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = null;
      example = "30s";
      description = ''
        Sets {option}`systemd.watchdog.runtimeTime`: systemd pings the machine's hardware watchdog,
        which resets a hung kernel after this long. A trial boot (`snapback deploy --reboot`) of a
        kernel that panics or hangs then falls back to the previous system by itself (the one-shot
        boot entry is used up) instead of waiting for someone to power-cycle the host; the agent
        records it as `reverted: boot-failed`. Needs a watchdog device (`/dev/watchdog`).
      '';
    };

    openFirewall = lib.mkOption {
      type = lib.types.bool;
      default = false;
      description = "Open {option}`services.snapback.settings.listen.port` in the firewall.";
    };

    metrics = {
      enable = lib.mkEnableOption ''
        the agent's Prometheus metrics on a listener of its own, read-only: it answers `GET /metrics`
        and refuses everything else. The same as `settings.metrics.listen`
      '';
      listenAddress = lib.mkOption {
        type = lib.types.str;
        default = "127.0.0.1";
        description = "Address the metrics listener binds to; a Prometheus on another host needs a reachable one.";
      };
      port = lib.mkOption {
        type = lib.types.port;
        default = 7732;
        description = "Port of the metrics listener.";
      };
      openFirewall = lib.mkOption {
        type = lib.types.bool;
        default = false;
        description = "Open {option}`services.snapback.metrics.port` in the firewall.";
      };
      textfile.enable = lib.mkOption {
        type = lib.types.bool;
        default = nodeExporter.enable;
        defaultText = lib.literalExpression "config.services.prometheus.exporters.node.enable";
        description = ''
          Write the metrics to `DIRECTORY/snapback.prom` for node-exporter's textfile collector
          (replaced atomically after every transition and every 10 seconds).
        '';
      };
      textfile.directory = lib.mkOption {
        type = lib.types.nullOr lib.types.str;
        default = null;
        description = ''
          The directory node-exporter's textfile collector reads. `null`: ${defaultTextfileDirectory},
          created by the module and given to `services.prometheus.exporters.node` as
          `--collector.textfile.directory` when that exporter is enabled. Set it to the directory
          your node-exporter reads already, and the module adds no flag and creates nothing.
        '';
      };
    };

    authorizedKeys = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = rootKeys.keys ++ lib.concatMap keyFileLines rootKeys.keyFiles;
      defaultText = lib.literalMD ''
        the keys in `config.users.users.root.openssh.authorizedKeys.keys`, then the lines of the
        files in `config.users.users.root.openssh.authorizedKeys.keyFiles` (without blank lines
        and comments)
      '';
      description = ''
        OpenSSH public keys (ssh-ed25519) of the operators allowed to deploy. By default, whoever may
        log in as root over SSH, from keys or keyFiles (read when the configuration is evaluated).
        Without any, the agent does not listen (the console still works).
        Lines keep their options: `from="…"` and `expiry-time="…"` are honoured; a line with
        `command=`, `restrict`, `principals=` or `cert-authority` is refused, never made an operator.
      '';
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = settingsPaths == [ ];
        message = settingsPathsMessage;
      }
      {
        assertion = stateDir == stateDirectory || within stateDirectory stateDir;
        message = ''
          services.snapback.settings.stateDir ("${stateDir}") must be ${stateDirectory} or a
          directory below it: the unit's StateDirectory=, which systemd keeps across restarts. The
          agent resumes a trial from it after the switch restarts the agent.
        '';
      }
      {
        assertion = within runtimeDirectory controlSocket;
        message = ''
          services.snapback.settings.controlSocket ("${controlSocket}") must be in
          ${runtimeDirectory}: the unit's RuntimeDirectory=, where the console reaches it (the unit's
          /tmp is private to it and /etc is read-only to it).
        '';
      }
    ];

    warnings = lib.optional (cfg.metrics.openFirewall && (!cfg.metrics.enable || loopback cfg.metrics.listenAddress)) ''
      services.snapback.metrics.openFirewall opens port ${toString cfg.metrics.port}, but ${
        if cfg.metrics.enable then "the metrics listener is on ${cfg.metrics.listenAddress}" else "services.snapback.metrics.enable is off"
      }: nothing from outside can scrape it. Set services.snapback.metrics.listenAddress.
    '';

    environment.etc."snapback/agent.json".source = configFile;
    environment.systemPackages = [ cfg.package ];
    networking.firewall.allowedTCPPorts =
      lib.optional cfg.openFirewall cfg.settings.listen.port
      ++ lib.optional (cfg.metrics.enable && cfg.metrics.openFirewall) cfg.metrics.port;

    # The textfile's directory, readable by node-exporter (the file itself is 0644).
    systemd.tmpfiles.rules = lib.mkIf (cfg.metrics.textfile.enable && cfg.metrics.textfile.directory == null) [
      "d ${defaultTextfileDirectory} 0755 root root -"
    ];
    services.prometheus.exporters.node.extraFlags = lib.mkIf (
      cfg.metrics.textfile.enable && cfg.metrics.textfile.directory == null && nodeExporter.enable
    ) [ "--collector.textfile.directory=${defaultTextfileDirectory}" ];
    systemd.watchdog.runtimeTime = lib.mkIf (cfg.hardwareWatchdog != null) cfg.hardwareWatchdog;

    systemd.services.snapback-agent = {
      description = "Snapback agent: commit-confirmed activation of NixOS systems";
      wantedBy = [ "multi-user.target" ];
      after = [ "network-online.target" "nix-daemon.socket" ];
      wants = [ "network-online.target" ];
      # NixOS puts coreutils, findutils, gnugrep, gnused and systemd in every service's PATH.
      path = [ config.nix.package pkgs.util-linux ];
      restartTriggers = [ configFile ];
      environment = {
        # Builds and substitutions run in the daemon, in its sandbox and as its build users, not
        # inside this hardened unit; the agent only asks for them.
        NIX_REMOTE = "daemon";
        # Nix keeps its fetcher and evaluation caches under XDG_CACHE_HOME; the home is read-only.
        XDG_CACHE_HOME = "%C/snapback";
        NODE_ENV = "production";
      };
      # A switch that changes this unit restarts it once, after activation; the agent then resumes
      # the trial from its state directory. A configuration without the agent leaves it running.
      stopIfChanged = false;
      unitConfig.X-StopOnRemoval = false;
      # Never give up restarting: a unit failed for good leaves a trial without its agent.
      unitConfig.StartLimitIntervalSec = 0;
      serviceConfig = {
        Type = "notify";
        NotifyAccess = "all";
        ExecStart = "${lib.getExe' cfg.package "snapback-agent"} serve --config /etc/snapback/agent.json";
        Restart = "always";
        RestartSec = "1s";
        WatchdogSec = "30s";
        # Node.js catches SIGABRT (the default watchdog signal); a frozen agent must die outright.
        WatchdogSignal = "SIGKILL";
        TimeoutStopSec = "30s";
        # stateDirectory and runtimeDirectory above.
        StateDirectory = "snapback";
        StateDirectoryMode = "0700";
        RuntimeDirectory = "snapback";
        RuntimeDirectoryMode = "0755";
        CacheDirectory = "snapback";
        # Hardening that still lets it switch the system: the switch runs in a transient unit
        # started by PID 1, so none of this applies to it. "full" makes /usr, /boot, /efi and /etc
        # read-only and leaves /nix alone: profiles and GC roots stay writable, the store is the
        # daemon's.
        ProtectSystem = "full";
        ProtectHome = "read-only";
        PrivateTmp = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectClock = true;
        RestrictSUIDSGID = true;
        RestrictRealtime = true;
        LockPersonality = true;
        SystemCallArchitectures = "native";
      };
    };
  };

  meta.maintainers = [ ];
}
