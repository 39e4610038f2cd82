# An ext4 filled to the last block on a portalbd device: the writer gets
# ENOSPC and the daemon nothing worse, e2fsck finds the filesystem clean,
# freed space can be written again, and parallel writers keep their data
# across a restart of the service.
{ pkgs, ... }:
let
  params = {
    INSTANCE = "full";
    DEVICE = "/dev/nbd0";
    NBD_PORT = 10809;
    # small, so filling it takes seconds; random data, so every block is stored
    DISK_BYTES = 512 * 1024 * 1024;
    MOUNT = "/mnt/full";
    STREAMS = 4;
    STREAM_MIB = 32;
  };
in
{
  name = "portalbd-resource-exhaustion";

  nodes.machine = {
    virtualisation = {
      memorySize = 2048;
      # the file store holds the whole disk, plus SlateDB's WAL and tables
      diskSize = 4096;
    };

    services.portalbd.instances.${params.INSTANCE} = {
      enable = true;
      settings = {
        device.size_bytes = params.DISK_BYTES;
        nbd.address = "127.0.0.1:${toString params.NBD_PORT}";
      };
      attach = {
        enable = true;
        device = params.DEVICE;
      };
    };

    environment.systemPackages = with pkgs; [
      e2fsprogs
      socat
      util-linux
    ];
  };

  testScript = (import ./lib.nix).testScript params ./resource-exhaustion.py;
}
