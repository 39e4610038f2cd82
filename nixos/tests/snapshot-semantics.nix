# Snapshots through portalctl: restore brings back the snapshot's data, every
# snapshot survives restores (newer ones too), deletes are final, and the
# catalog outlives a restart of the daemon.
{ pkgs, ... }:
let
  params = {
    INSTANCE = "snap";
    DEVICE = "/dev/nbd0";
    NBD_PORT = 10809;
  };
in
{
  name = "portalbd-snapshot-semantics";

  nodes.machine = {
    services.portalbd.instances.${params.INSTANCE} = {
      enable = true;
      settings = {
        device.disk_size_gb = 1;
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

  testScript = (import ./lib.nix).testScript params ./snapshot-semantics.py;
}
