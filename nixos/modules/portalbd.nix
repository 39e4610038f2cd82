# services.portalbd: any number of portalbd block devices, one systemd
# service (portalbd-<name>.service) per enabled instance.
#
# Configurations written for the original module keep evaluating: each
# instance still has `enable`, `environmentFile`, `package` and a `settings`
# tree that is rendered verbatim to the instance's TOML config file.
{
  config,
  lib,
  pkgs,
  utils,
  ...
}:

let
  inherit (lib)
    literalExpression
    mkEnableOption
    mkIf
    mkOption
    mkPackageOption
    types
    ;

  cfg = config.services.portalbd;
  settingsFormat = pkgs.formats.toml { };

  enabled = lib.filterAttrs (_: inst: inst.enable) cfg.instances;

  # A null option means "let the daemon pick"; TOML has no null, so drop them.
  # Tables left empty by that are dropped too.
  dropNulls =
    value:
    if lib.isAttrs value && !lib.isDerivation value then
      lib.filterAttrs (_: v: v != null && v != { }) (lib.mapAttrs (_: dropNulls) value)
    else if lib.isList value then
      map dropNulls value
    else
      value;

  # The instance's snapshots option becomes the file's [snapshots] table.
  renderedSettings =
    inst:
    inst.settings
    // lib.optionalAttrs (inst.snapshots.every != null) { snapshots = inst.snapshots; };

  configFile =
    name: inst: settingsFormat.generate "portalbd-${name}.toml" (dropNulls (renderedSettings inst));

  # "127.0.0.1:10809" / "[::1]:10809" / "" (listener off).
  addressPort = address: if address == "" then null else lib.toInt (lib.last (lib.splitString ":" address));
  addressHost =
    address:
    lib.removePrefix "[" (lib.removeSuffix "]" (lib.removeSuffix ":${lib.last (lib.splitString ":" address)}" address));

  nbdPort = inst: addressPort inst.settings.nbd.address;
  metricsPort =
    inst: if inst.settings.metrics.address == null then null else addressPort inst.settings.metrics.address;

  # TLS files reach the daemon as systemd credentials, under the unit's
  # credentials directory, and as flags (which beat the rendered settings).
  tlsFiles =
    inst:
    lib.filterAttrs (_: file: file != null) {
      tls-certificate = inst.tls.certificateFile;
      tls-key = inst.tls.keyFile;
      tls-ca = inst.tls.caFile;
    };
  tlsCredentials = inst: lib.mapAttrsToList (id: file: "${id}:${file}") (tlsFiles inst);
  tlsArgs =
    name: inst:
    lib.concatLists (
      lib.mapAttrsToList (id: _: [
        "--${id}"
        "/run/credentials/portalbd-${name}.service/${id}"
      ]) (tlsFiles inst)
    )
    ++ lib.optionals (inst.tls.mode != null) [
      "--tls"
      inst.tls.mode
    ];
  tlsRequired =
    inst: (if inst.tls.mode != null then inst.tls.mode else if inst.tls.certificateFile != null then "require" else "off") == "require";

  isS3 = inst: lib.hasPrefix "s3://" (toString inst.settings.storage.url);
  needsInet =
    inst: nbdPort inst != null || metricsPort inst != null || isS3 inst;

  # network-online.target only when the daemon needs the network up to
  # start: an S3 bucket, or a listener on an address other than loopback or
  # the wildcard (binding one fails until it is configured).
  bindsSpecificAddress =
    address:
    address != null
    && address != ""
    && !(lib.elem (addressHost address) [
      "0.0.0.0"
      "::"
      "::1"
      "localhost"
    ])
    && !(lib.hasPrefix "127." (addressHost address));
  needsNetworkOnline =
    inst:
    isS3 inst
    || bindsSpecificAddress inst.settings.nbd.address
    || bindsSpecificAddress inst.settings.metrics.address;

  # Instance names become unit names (portalbd-<name>.service) and paths
  # (/run/portalbd/<name>): the daemon's rule for instance.name, in ASCII.
  validName = name: builtins.match "[A-Za-z0-9_-][A-Za-z0-9_.-]*" name != null;

  fileStoreDir =
    inst:
    let
      url = toString inst.settings.storage.url;
    in
    if lib.hasPrefix "file://" url then lib.removePrefix "file://" url else null;

  # The kernel makes 16 NBD devices (nbd0..nbd15) unless nbds_max says more.
  nbdIndex = device: lib.toInt (lib.removePrefix "/dev/nbd" device);
  defaultNbdsMax = 16;

  # The daemon's memory budgets (portalbd/instance.py logs them at start),
  # with the daemon's defaults where the settings leave a value out;
  # tests/system/test_nix.py checks these defaults against portalbd/config.py.
  MiB = 1024 * 1024;
  GiB = 1024 * MiB;
  memoryBudget =
    s:
    let
      get =
        set: key: default:
        if set != null && (set.${key} or null) != null then set.${key} else default;
      device = s.device or { };
      diskBytes =
        if (device.size_bytes or null) != null then
          device.size_bytes
        else
          (if device.disk_size_gb != null then device.disk_size_gb else 1) * GiB;
    in
    get device "cache_bytes" (128 * MiB)
    + get device "dirty_bytes" (64 * MiB)
    + get s.lsm "max_unflushed_bytes" (128 * MiB)
    + get s.lsm "block_cache_size_bytes" (32 * MiB)
    # NBD payloads in flight (NbdLimits().budget)
    + 128 * MiB
    # memory:// keeps the whole disk in the daemon
    + (if lib.hasPrefix "memory://" (toString s.storage.url) then diskBytes else 0);
  # The interpreter, SlateDB's compaction and the allocator run some 100 MiB
  # above the budgets; leave room for that and more.
  memoryHeadroom = 256 * MiB;

  # Everything the daemon writes, so ProtectSystem=strict can stay on: paths
  # under /run and /var/lib become extra RuntimeDirectory / StateDirectory
  # entries (systemd creates them, owned by the service user); anything else
  # must already exist and is opened up with ReadWritePaths.
  writableDirs =
    inst:
    let
      s = inst.settings;
      fileStore = lib.optional (lib.hasPrefix "file://" (toString s.storage.url)) (
        lib.removePrefix "file://" s.storage.url
      );
    in
    lib.unique (
      map dirOf (
        [ s.socket ]
        ++ lib.optional (s.nbd.socket != null) s.nbd.socket
        ++ lib.optional (s.record != null) s.record.path
      )
      ++ fileStore
    );
  underDir = prefix: dir: lib.hasPrefix prefix dir && dir != lib.removeSuffix "/" prefix;
  runtimeDirs = inst: map (lib.removePrefix "/run/") (lib.filter (underDir "/run/") (writableDirs inst));
  stateDirs =
    inst: map (lib.removePrefix "/var/lib/") (lib.filter (underDir "/var/lib/") (writableDirs inst));
  otherDirs =
    inst:
    lib.filter (d: !(underDir "/run/" d) && !(underDir "/var/lib/" d)) (writableDirs inst);

  # Values shared by several instances, for the uniqueness assertions.
  duplicates =
    pairs:
    let
      grouped = lib.groupBy (p: toString p.value) pairs;
    in
    lib.filterAttrs (_: ps: lib.length ps > 1) grouped;
  describeDuplicates =
    what: dups:
    lib.concatStringsSep "; " (
      lib.mapAttrsToList (
        value: ps: "${what} ${value} is used by ${lib.concatMapStringsSep ", " (p: p.instance) ps}"
      ) dups
    );

  ports = lib.concatLists (
    lib.mapAttrsToList (
      name: inst:
      map (value: {
        instance = name;
        inherit value;
      }) (lib.filter (p: p != null) [ (nbdPort inst) (metricsPort inst) ])
    ) enabled
  );
  sockets = lib.concatLists (
    lib.mapAttrsToList (
      name: inst:
      map
        (value: {
          instance = name;
          inherit value;
        })
        ([ inst.settings.socket ] ++ lib.optional (inst.settings.nbd.socket != null) inst.settings.nbd.socket)
    ) enabled
  );
  attachDevices = lib.concatLists (
    lib.mapAttrsToList (
      name: inst:
      lib.optional inst.attach.enable {
        instance = name;
        value = inst.attach.device;
      }
    ) enabled
  );

  nullOrPositive =
    description:
    mkOption {
      type = types.nullOr types.ints.positive;
      default = null;
      inherit description;
    };

  instanceModule =
    { name, config, ... }:
    {
      options = {
        enable = mkEnableOption "this portalbd instance";

        package = mkOption {
          type = types.package;
          default = cfg.package;
          defaultText = literalExpression "config.services.portalbd.package";
          description = "The portalbd package this instance runs.";
        };

        memoryMax = mkOption {
          type = types.nullOr types.ints.positive;
          default = memoryBudget config.settings + memoryHeadroom;
          defaultText = lib.literalMD "the instance's memory budgets plus 256 MiB";
          example = 2 * GiB;
          description = ''
            `MemoryMax=` of the daemon's unit, in bytes. The default adds up
            the budgets the daemon logs at start (`device.cache_bytes`,
            `device.dirty_bytes`, `lsm.max_unflushed_bytes`,
            `lsm.block_cache_size_bytes`, 128 MiB of NBD payloads, the disk
            itself for `memory://`) and 256 MiB of headroom, so a runaway
            daemon is stopped before it takes the host's memory. `null`: no
            limit.
          '';
        };

        environmentFile = mkOption {
          # `str` as well, so a relative path reaches the assertion below and
          # gets a clear message instead of a type error.
          type = types.nullOr (types.either types.path types.str);
          default = null;
          example = "/run/secrets/portalbd-s3.env";
          description = ''
            Environment file read by systemd before starting the daemon
            (`EnvironmentFile=`). Put object-store credentials here
            (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT`,
            `AWS_REGION`, `AWS_ALLOW_HTTP`), never in {option}`settings`,
            which ends up world-readable in the Nix store. Give it as an
            absolute path string so the file stays out of the store.
          '';
        };

        user = mkOption {
          type = types.nullOr types.str;
          default = null;
          example = "portalbd";
          description = ''
            User the daemon runs as. `null` uses a transient user
            (`DynamicUser=`), which is right unless other local users need
            the control socket; a named user is created as a system user.
          '';
        };

        group = mkOption {
          type = types.nullOr types.str;
          default = config.user;
          defaultText = literalExpression "config.services.portalbd.instances.<name>.user";
          description = ''
            Group of the daemon. Members may use the control socket (mode
            0660), e.g. `portalctl --instance ${name} status`.
          '';
        };

        openFirewall = mkOption {
          type = types.bool;
          default = false;
          description = "Open the NBD TCP port of this instance in the firewall.";
        };

        extraArgs = mkOption {
          type = types.listOf types.str;
          default = [ ];
          example = [
            "--log-level"
            "debug"
          ];
          description = "Extra command-line arguments for the daemon (they override the config file).";
        };

        tls = {
          certificateFile = mkOption {
            type = types.nullOr types.str;
            default = null;
            example = "/run/secrets/portalbd/server-cert.pem";
            description = ''
              PEM certificate for NBD over TLS. Given to the daemon as a
              systemd credential (`LoadCredential=`), so the file may be
              readable by root alone and never enters the Nix store; give an
              absolute path string. Setting it makes TLS required unless
              {option}`tls.mode` says otherwise (docs/security.md).
            '';
          };

          keyFile = mkOption {
            type = types.nullOr types.str;
            default = null;
            example = "/run/secrets/portalbd/server-key.pem";
            description = "PEM private key of {option}`tls.certificateFile`, as a credential too.";
          };

          caFile = mkOption {
            type = types.nullOr types.str;
            default = null;
            example = "/etc/portalbd/clients-ca.pem";
            description = "When set, NBD clients must present a certificate this CA signed.";
          };

          mode = mkOption {
            type = types.nullOr (
              types.enum [
                "require"
                "allow"
                "off"
              ]
            );
            default = null;
            description = ''
              `require`: only TLS clients; `allow`: TLS or plain text; `off`.
              `null`: `require` with a certificate, `off` without.
            '';
          };
        };

        snapshots = {
          every = mkOption {
            type = types.nullOr (types.strMatching "[1-9][0-9]*[smhd]");
            default = null;
            example = "15m";
            description = ''
              Take a snapshot this often (`30s`, `15m`, `1h`, `1d`), named
              `auto-<UTC time>`, and prune the old scheduled ones
              (docs/snapshots.md). Manual snapshots are never pruned.
              `null`: no schedule.
            '';
          };

          keep = mkOption {
            type = types.nullOr types.ints.positive;
            default = null;
            example = 96;
            description = "How many of the newest scheduled snapshots to keep; needed with {option}`snapshots.every`.";
          };

          keep_daily = mkOption {
            type = types.nullOr types.ints.unsigned;
            default = null;
            example = 7;
            description = "Also keep the newest scheduled snapshot of each of the last N days that have one.";
          };

          keep_weekly = mkOption {
            type = types.nullOr types.ints.unsigned;
            default = null;
            example = 4;
            description = "Also keep the newest scheduled snapshot of each of the last N ISO weeks that have one.";
          };
        };

        attach = {
          enable = mkEnableOption ''
            a companion unit, `portalbd-${name}-attach.service`, that connects
            this instance to a kernel NBD device with `nbd-client` once the
            daemon is ready and disconnects it before the daemon stops
          '';

          device = mkOption {
            type = types.strMatching "/dev/nbd[0-9]+";
            default = "/dev/nbd0";
            description = "Kernel NBD device to attach to.";
          };

          connections = mkOption {
            type = types.ints.positive;
            default = 1;
            description = "Number of NBD connections the kernel opens (`nbd-client -C`).";
          };

          extraArgs = mkOption {
            type = types.listOf types.str;
            default = [ ];
            example = [
              "-b"
              "4096"
            ];
            description = "Extra arguments for `nbd-client`.";
          };
        };

        settings = mkOption {
          default = { };
          description = ''
            portalbd configuration, rendered to the instance's TOML file
            (see docs/configuration.md). Keys without an option here are
            passed through unchanged.
          '';
          type = types.submodule {
            freeformType = settingsFormat.type;

            options = {
              instance.name = mkOption {
                type = types.str;
                default = name;
                defaultText = literalExpression "<name>";
                description = "Instance name; names logs, metrics and the daemon's default paths.";
              };

              device.disk_size_gb = mkOption {
                type = types.nullOr types.ints.positive;
                default = null;
                example = 100;
                description = ''
                  Virtual disk size in GiB (`device.size_bytes` gives an
                  exact size instead). `null`: the daemon's default, 1 GiB.
                '';
              };

              storage.url = mkOption {
                type = types.nullOr types.str;
                default = "file:///var/lib/portalbd/${name}/store";
                defaultText = literalExpression ''"file:///var/lib/portalbd/<name>/store"'';
                example = "s3://my-bucket/portalbd/main";
                description = ''
                  Where the disk's blocks live: `file:///abs/dir`,
                  `s3://bucket/prefix` (credentials from
                  {option}`environmentFile`) or `memory://` (lost when the
                  daemon stops).
                '';
              };

              nbd = {
                address = mkOption {
                  type = types.strMatching "(.+:[0-9]+)?";
                  default = "127.0.0.1:10809";
                  example = "[::]:10809";
                  description = ''NBD TCP listener, `host:port`; `""` turns it off.'';
                };

                socket = mkOption {
                  type = types.nullOr types.path;
                  default = null;
                  example = "/run/portalbd/main/nbd.sock";
                  description = "Optional NBD Unix socket listener.";
                };
              };

              socket = mkOption {
                type = types.path;
                default = "/run/portalbd/${name}/control.sock";
                defaultText = literalExpression ''"/run/portalbd/<name>/control.sock"'';
                description = ''
                  Control socket. The default is where `portalctl --instance <name>`
                  and the TUI look for it.
                '';
              };

              metrics.address = mkOption {
                type = types.nullOr (types.strMatching ".+:[0-9]+");
                default = null;
                example = "127.0.0.1:9810";
                description = "Prometheus endpoint, `host:port`; off when null.";
              };

              lsm = mkOption {
                default = null;
                description = "SlateDB tuning; null leaves every value at the daemon's default.";
                type = types.nullOr (
                  types.submodule {
                    freeformType = settingsFormat.type;
                    options = {
                      flush_interval_ms = nullOrPositive "Interval between WAL flushes, in milliseconds.";
                      l0_sst_size_bytes = nullOrPositive "Target size of L0 SSTs, in bytes.";
                      l0_max_ssts = nullOrPositive "L0 SSTs allowed before writes wait for compaction.";
                      max_unflushed_bytes = nullOrPositive "Unflushed bytes allowed before writes wait.";
                      filter_bits_per_key = nullOrPositive "Bloom filter bits per key.";
                      block_cache_size_bytes = nullOrPositive "SlateDB block cache size, in bytes.";
                    };
                  }
                );
              };

              record = mkOption {
                default = null;
                description = "Record every NBD request to a trace file while the daemon runs.";
                type = types.nullOr (
                  types.submodule {
                    freeformType = settingsFormat.type;
                    options = {
                      path = mkOption {
                        type = types.path;
                        example = "/var/lib/portalbd/main/trace.jsonl.zst";
                        description = "Trace file (`.zst` or `.gz` compresses it).";
                      };
                      workload = mkOption {
                        type = types.str;
                        default = "unnamed";
                        description = "Workload name stored in the trace header.";
                      };
                    };
                  }
                );
              };
            };
          };
        };
      };
    };

  mkService =
    name: inst:
    let
      hardening = {
        # The daemon needs no privilege at all: no capabilities, no devices,
        # no writable system paths beyond its own directories.
        CapabilityBoundingSet = [ "" ];
        AmbientCapabilities = [ "" ];
        NoNewPrivileges = true;
        ProtectSystem = "strict";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        DevicePolicy = "closed";
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        ProtectProc = "invisible";
        LockPersonality = true;
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        RemoveIPC = true;
        RestrictAddressFamilies = [ "AF_UNIX" ] ++ lib.optionals (needsInet inst) [
          "AF_INET"
          "AF_INET6"
        ];
        SystemCallArchitectures = "native";
        SystemCallFilter = [
          "@system-service"
          "~@privileged"
        ];
        SystemCallErrorNumber = "EPERM";
        # MemoryDenyWriteExecute stays off: the SlateDB binding calls back
        # into Python through ctypes, whose libffi closures may need
        # writable+executable pages.
        UMask = "0027";
      };
    in
    lib.nameValuePair "portalbd-${name}" {
      description = "portalbd network block device (${name})";
      wantedBy = [ "multi-user.target" ];
      wants =
        lib.optional (needsNetworkOnline inst) "network-online.target"
        ++ lib.optional inst.attach.enable "portalbd-${name}-attach.service";
      after = [ "network.target" ] ++ lib.optional (needsNetworkOnline inst) "network-online.target";

      serviceConfig = hardening // {
        # The daemon sends READY=1 once its listeners accept connections.
        Type = "notify";
        NotifyAccess = "main";
        ExecStart = utils.escapeSystemdExecArgs (
          [
            (lib.getExe' inst.package "portalbd")
            "--config"
            (configFile name inst)
          ]
          ++ tlsArgs name inst
          ++ inst.extraArgs
        );
        # SIGTERM makes the daemon drain its connections and flush every
        # acknowledged write before exiting; give a slow bucket time.
        KillMode = "mixed";
        TimeoutStopSec = "5min";
        Restart = "on-failure";
        RestartSec = 5;

        RuntimeDirectory = lib.unique ([ "portalbd/${name}" ] ++ runtimeDirs inst);
        RuntimeDirectoryMode = "0750";
        StateDirectory = lib.unique ([ "portalbd/${name}" ] ++ stateDirs inst);
        StateDirectoryMode = "0750";
        # the local cache of an S3 disk's objects (CACHE_DIRECTORY for the daemon)
        CacheDirectory = "portalbd/${name}";
        CacheDirectoryMode = "0700";
        ReadWritePaths = map (d: "-${d}") (otherDirs inst);
      }
      // lib.optionalAttrs (inst.memoryMax != null) {
        MemoryMax = toString inst.memoryMax;
      }
      // (
        if inst.user == null then
          { DynamicUser = true; }
          // lib.optionalAttrs (inst.group != null) { Group = inst.group; }
        else
          {
            User = inst.user;
            Group = inst.group;
          }
      )
      // lib.optionalAttrs (inst.environmentFile != null) {
        EnvironmentFile = toString inst.environmentFile;
      }
      // lib.optionalAttrs (tlsCredentials inst != [ ]) {
        # systemd copies them to /run/credentials/<unit>/, readable by the
        # service alone, whatever the modes of the originals.
        LoadCredential = tlsCredentials inst;
      };
    };

  mkAttachService =
    name: inst:
    let
      s = inst.settings;
      exportName = s.nbd.export_name or "portalbd";
      target =
        if s.nbd.socket != null then
          [
            "-unix"
            s.nbd.socket
          ]
        else
          let
            host = addressHost s.nbd.address;
          in
          [
            (if lib.elem host [ "0.0.0.0" "" ] then "127.0.0.1" else if host == "::" then "::1" else host)
            (toString (nbdPort inst))
          ];
      nbdClient = lib.getExe' pkgs.nbd "nbd-client";
    in
    lib.nameValuePair "portalbd-${name}-attach" {
      description = "Attach portalbd instance ${name} to ${inst.attach.device}";
      wantedBy = [ "multi-user.target" ];
      # Ordered after the daemon, so it detaches before the daemon stops and
      # attaches only once the daemon is ready. BindsTo: gone when the daemon
      # goes (even on a crash); PartOf: restarted with it. The daemon wants
      # this unit, so an automatic restart of the daemon re-attaches too.
      bindsTo = [ "portalbd-${name}.service" ];
      partOf = [ "portalbd-${name}.service" ];
      after = [ "portalbd-${name}.service" ];
      serviceConfig = {
        Type = "oneshot";
        RemainAfterExit = true;
        ExecStart = utils.escapeSystemdExecArgs (
          [ nbdClient ]
          ++ target
          ++ [
            inst.attach.device
            "-N"
            exportName
          ]
          ++ lib.optionals (inst.attach.connections > 1) [
            "-C"
            (toString inst.attach.connections)
          ]
          ++ inst.attach.extraArgs
        );
        ExecStop = utils.escapeSystemdExecArgs [
          nbdClient
          "-d"
          inst.attach.device
        ];
      };
    };

  instanceAssertions =
    name: inst:
    let
      opt = "services.portalbd.instances.${name}";
      s = inst.settings;
    in
    [
      {
        assertion = validName name;
        message = "services.portalbd.instances.\"${name}\": the name becomes unit names and paths (portalbd-${name}.service, /run/portalbd/${name}), so it must be letters, digits, '-', '_' or '.' (not leading).";
      }
      {
        assertion =
          inst.user != null || fileStoreDir inst == null || underDir "/var/lib/" (fileStoreDir inst);
        message = "${opt}.settings.storage.url is ${toString s.storage.url}, outside /var/lib: the transient user (DynamicUser) cannot write there. Keep the store under /var/lib (the default is file:///var/lib/portalbd/${name}/store), or set ${opt}.user and create the directory owned by that user (systemd.tmpfiles.rules).";
      }
      {
        assertion = s.storage.url != null;
        message = ''${opt}.settings.storage.url must be set (use "memory://" for a disk that lives in RAM).'';
      }
      {
        assertion = inst.environmentFile == null || lib.hasPrefix "/" (toString inst.environmentFile);
        message = "${opt}.environmentFile must be an absolute path, got ${toString inst.environmentFile}.";
      }
      {
        assertion = s.nbd.address != "" || s.nbd.socket != null;
        message = "${opt} has no NBD listener: set settings.nbd.address or settings.nbd.socket.";
      }
      {
        assertion = lib.all (file: lib.hasPrefix "/" file) (lib.attrValues (tlsFiles inst));
        message = "${opt}.tls: certificateFile, keyFile and caFile must be absolute paths.";
      }
      {
        assertion = (inst.tls.certificateFile != null) == (inst.tls.keyFile != null);
        message = "${opt}.tls: certificateFile and keyFile go together.";
      }
      {
        assertion = inst.attach.enable -> !tlsRequired inst;
        message = "${opt}.attach does not speak TLS yet: set ${opt}.tls.mode = \"allow\" (the local attach stays on plain text) or turn attach off.";
      }
      {
        assertion = inst.snapshots.every != null -> inst.snapshots.keep != null;
        message = "${opt}.snapshots.keep must be set with snapshots.every: how many scheduled snapshots to keep.";
      }
      {
        assertion =
          inst.snapshots.every == null
          -> lib.all (v: v == null) [ inst.snapshots.keep inst.snapshots.keep_daily inst.snapshots.keep_weekly ];
        message = "${opt}.snapshots: keep, keep_daily and keep_weekly do nothing without snapshots.every (how often to take one, e.g. \"15m\").";
      }
      {
        assertion = inst.snapshots.every != null -> !(s ? snapshots);
        message = "${opt}: set the schedule in ${opt}.snapshots or in settings.snapshots, not both.";
      }
      {
        assertion = inst.user != null -> inst.group != null;
        message = "${opt}.group must be set when ${opt}.user is.";
      }
      {
        assertion = inst.user != "root";
        message = "${opt}.user must not be root: the daemon needs no privileges.";
      }
    ];
in
{
  options.services.portalbd = {
    package = mkPackageOption pkgs "portalbd" { };

    instances = mkOption {
      type = types.attrsOf (types.submodule instanceModule);
      default = { };
      description = "portalbd block devices, one daemon each.";
      example = literalExpression ''
        {
          main = {
            enable = true;
            settings = {
              device.disk_size_gb = 100;
              storage.url = "s3://my-bucket/main";
              nbd.address = "127.0.0.1:10809";
            };
            environmentFile = "/run/secrets/portalbd-s3.env";
            attach.enable = true;
          };
          scratch = {
            enable = true;
            settings = {
              device.disk_size_gb = 10;
              nbd.address = "127.0.0.1:10810";
            };
          };
        }
      '';
    };
  };

  config = mkIf (enabled != { }) {
    assertions =
      lib.concatLists (lib.mapAttrsToList instanceAssertions enabled)
      ++ [
        {
          assertion = duplicates ports == { };
          message = "services.portalbd: TCP ports must differ between instances: ${describeDuplicates "port" (duplicates ports)}.";
        }
        {
          assertion = duplicates sockets == { };
          message = "services.portalbd: sockets must differ between instances: ${describeDuplicates "socket" (duplicates sockets)}.";
        }
        {
          assertion = duplicates attachDevices == { };
          message = "services.portalbd: attach devices must differ between instances: ${describeDuplicates "device" (duplicates attachDevices)}.";
        }
      ];

    warnings = lib.concatLists (
      lib.mapAttrsToList (
        name: inst:
        lib.optional (builtins.isPath inst.environmentFile)
          "services.portalbd.instances.${name}.environmentFile is a Nix path, so its secrets are copied to the world-readable Nix store; give it as a string."
      ) enabled
    );

    # portalctl, portalbd-tui and friends for the administrator.
    environment.systemPackages = lib.unique (lib.mapAttrsToList (_: inst: inst.package) enabled);

    boot.kernelModules = lib.optional (lib.any (inst: inst.attach.enable) (lib.attrValues enabled)) "nbd";
    # Attach devices past nbd15 exist only when the module is loaded with
    # enough of them.
    boot.extraModprobeConfig =
      let
        highest = lib.foldl' lib.max (-1) (map (d: nbdIndex d.value) attachDevices);
      in
      lib.mkIf (highest >= defaultNbdsMax) "options nbd nbds_max=${toString (highest + 1)}";

    networking.firewall.allowedTCPPorts = lib.concatLists (
      lib.mapAttrsToList (
        _: inst: lib.optional (inst.openFirewall && nbdPort inst != null) (nbdPort inst)
      ) enabled
    );

    users.users = lib.mkMerge (
      lib.mapAttrsToList (
        _: inst:
        lib.optionalAttrs (inst.user != null) {
          ${inst.user} = {
            isSystemUser = true;
            group = inst.group;
          };
        }
      ) enabled
    );
    users.groups = lib.mkMerge (
      lib.mapAttrsToList (
        _: inst: lib.optionalAttrs (inst.user != null && inst.group != null) { ${inst.group} = { }; }
      ) enabled
    );

    systemd.services = lib.mapAttrs' mkService enabled // lib.mapAttrs' mkAttachService (lib.filterAttrs (_: inst: inst.attach.enable) enabled);
  };
}
