# Record mkfs.ext4 (plus a first mount) through the kernel client with the
# module's `record` setting, and run the mkfs trace generator
# (`portalbd-trace gen mkfs`, nbdfuse + loop device) in the same VM. Both
# traces are checked with `portalbd-trace info` and copied to the test output.
{ pkgs, ... }:
let
  params = {
    INSTANCE = "trace";
    DEVICE = "/dev/nbd0";
    NBD_PORT = 10809;
    TRACE = "/var/lib/portalbd/trace/mkfs.jsonl.zst";
    GENERATED = "/root/traces/mkfs-generated.jsonl.zst";
  };
in
{
  name = "portalbd-trace-mkfs";

  nodes.machine = {
    virtualisation.memorySize = 2048;

    services.portalbd.instances.${params.INSTANCE} = {
      enable = true;
      settings = {
        device.disk_size_gb = 1;
        nbd.address = "127.0.0.1:${toString params.NBD_PORT}";
        record = {
          path = params.TRACE;
          workload = "mkfs";
        };
      };
      attach = {
        enable = true;
        device = params.DEVICE;
      };
    };

    environment.systemPackages = with pkgs; [
      e2fsprogs
      fuse3
      libnbd # nbdfuse, for the generator
      socat
      util-linux
    ];
  };

  testScript = (import ./lib.nix).testScript params ./trace-mkfs.py;
}
