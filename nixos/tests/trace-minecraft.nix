# Record a Minecraft server (nixpkgs' minecraft-server, unfree) generating
# and saving its world on the kernel-attached device.
{ pkgs, lib, ... }:
let
  params = {
    INSTANCE = "trace";
    DEVICE = "/dev/nbd0";
    NBD_PORT = 10809;
    TRACE = "/var/lib/portalbd/trace/traces/minecraft.jsonl.zst"; # TraceStart writes only in the instance's traces/ directory
    WORLD_DIR = "/mnt/disk/minecraft";
  };
in
{
  name = "portalbd-trace-minecraft";

  nodes.machine = {
    virtualisation.memorySize = 4096;
    virtualisation.cores = 2;

    services.portalbd.instances.${params.INSTANCE} = {
      enable = true;
      settings = {
        device.disk_size_gb = 4;
        nbd.address = "127.0.0.1:${toString params.NBD_PORT}";
      };
      attach = {
        enable = true;
        device = params.DEVICE;
      };
    };

    services.minecraft-server = {
      enable = true;
      eula = true;
      dataDir = params.WORLD_DIR;
      jvmOpts = "-Xms1G -Xmx2G";
    };
    # Started by the test once the portalbd disk is mounted.
    systemd.services.minecraft-server.wantedBy = lib.mkForce [ ];

    environment.systemPackages = with pkgs; [
      e2fsprogs
      socat
      util-linux
    ];
  };

  testScript = (import ./lib.nix).testScript params ./trace-minecraft.py;
}
