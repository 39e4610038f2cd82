# One instance attached to /dev/nbd0 by the module's attach unit: a real
# filesystem on it survives a restart of the service, and a clean stop keeps
# every acknowledged write.
{ pkgs, ... }:
let
  params = {
    INSTANCE = "test";
    NBD_PORT = 10809;
    DEVICE = "/dev/nbd0";
    DISK_SIZE_GB = 1;
    STORE_DIR = "/var/lib/portalbd/test/store";
  };
in
{
  name = "portalbd-basic";

  nodes.machine = {
    services.portalbd.instances.${params.INSTANCE} = {
      enable = true;
      settings = {
        device.disk_size_gb = params.DISK_SIZE_GB;
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

  testScript = (import ./lib.nix).testScript params ./basic.py;
}
