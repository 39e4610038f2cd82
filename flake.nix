{
  description = "portalbd: a network block device whose disk lives in SlateDB on object storage";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";

  outputs =
    { self, nixpkgs }:
    let
      inherit (nixpkgs) lib;

      # The SlateDB wheel exists for these two (overlays/slatedb.nix).
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forAllSystems = f: lib.genAttrs systems (system: f (pkgsFor system));
      pkgsFor =
        system:
        import nixpkgs {
          inherit system;
          overlays = [ self.overlays.default ];
          # trace-minecraft runs the (unfree) Minecraft server.
          config.allowUnfreePredicate = pkg: lib.getName pkg == "minecraft-server";
        };

      # One file per VM test under nixos/tests/, its script beside it.
      vmTests = [
        "basic"
        "snapshot-semantics"
        "crash-recovery"
        "multi-instance"
        "trace-mkfs"
        "trace-pgbench"
        "trace-minecraft"
        "csi-k3s"
        "resource-exhaustion"
        "pjdfstest"
      ];
      # These copy the traces they record to the test's output directory.
      traceTests = [
        "trace-mkfs"
        "trace-pgbench"
        "trace-minecraft"
      ];

      # The tests this platform runs (a test's meta.platforms may narrow it).
      testsFor =
        pkgs:
        lib.filter (
          name:
          (import ./nixos/tests/lib.nix).runsOn pkgs.stdenv.hostPlatform.system (
            ./nixos/tests + "/${name}.nix"
          )
        ) vmTests;

      mkTest =
        pkgs: name:
        pkgs.testers.runNixOSTest {
          imports = [ (./nixos/tests + "/${name}.nix") ];
          defaults.imports = [ self.nixosModules.portalbd ];
        };
    in
    {
      overlays.default = import ./overlays;

      # The module alone: it takes the package from `pkgs.portalbd`, so use
      # it with the overlay (or set services.portalbd.package).
      nixosModules.portalbd = ./nixos/modules/portalbd.nix;
      # The module with this flake's package as the default.
      nixosModules.default =
        { pkgs, ... }:
        {
          imports = [ self.nixosModules.portalbd ];
          services.portalbd.package = lib.mkDefault self.packages.${pkgs.stdenv.hostPlatform.system}.portalbd;
        };

      packages = forAllSystems (pkgs: {
        inherit (pkgs) portalbd;
        default = pkgs.portalbd;
        # The CSI driver's container image (deploy/ refers to portalbd-csi:latest):
        # the driver plus what NodeStageVolume runs to attach and format volumes.
        csi-image = pkgs.dockerTools.buildLayeredImage {
          name = "portalbd-csi";
          tag = "latest";
          contents = with pkgs; [
            portalbd
            util-linux
            libnbd
            nbdkit # the proxy under nbdfuse: reconnects to a restarted daemon
            fuse3
            e2fsprogs
            xfsprogs
            nbd
            coreutils
            bashInteractive
          ];
          config = {
            Entrypoint = [ "${pkgs.portalbd}/bin/portalbd-csi" ];
            Env = [ "PATH=/bin" ];
          };
        };
      });

      checks = forAllSystems (
        pkgs:
        lib.genAttrs (testsFor pkgs) (mkTest pkgs)
        // {
          inherit (pkgs) portalbd;
        }
      );

      # `nix run .#test-basic` runs one VM test interactively-debuggable on
      # this machine (needs KVM); trace tests write their traces to ./traces.
      apps = forAllSystems (
        pkgs:
        lib.listToAttrs (
          map (
            name:
            let
              driver = (mkTest pkgs name).driver;
              isTrace = lib.elem name traceTests;
              script = pkgs.writeShellScript "portalbd-test-${name}" ''
                set -eu
                ${lib.optionalString isTrace ''mkdir -p traces''}
                exec ${driver}/bin/nixos-test-driver ${lib.optionalString isTrace "--output_directory traces"} "$@"
              '';
            in
            lib.nameValuePair "test-${name}" {
              type = "app";
              program = "${script}";
              meta.description = "Run the ${name} NixOS VM test";
            }
          ) (testsFor pkgs)
        )
      );

      devShells = forAllSystems (pkgs: {
        default = pkgs.mkShell {
          inputsFrom = [ pkgs.portalbd ];
          packages = with pkgs; [
            (python3.withPackages (
              ps:
              let
                deps = import ./overlays/python-deps.nix;
              in
              lib.mapAttrsToList (_: attr: ps.${attr}) (
                deps.python // deps.extras.trace // deps.extras.csi
              )
              ++ (ps.moto.optional-dependencies.server or [ ])
              ++ (with ps; [
                pytest
                pytest-timeout
                hypothesis
                moto
                mypy
                libnbd
              ])
            ))
            ruff
            libnbd
            nbd
            nbdkit
            qemu-utils
            fio
            fuse3
            e2fsprogs
            xfsprogs
            nixfmt
          ];
        };
      });

      formatter = forAllSystems (pkgs: pkgs.nixfmt);
    };
}
