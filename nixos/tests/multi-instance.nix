# Three instances side by side: distinct ports, sockets, devices and users;
# portalctl and the TUI find each by name; one going down leaves the others.
{ pkgs, lib, ... }:
let
  params = {
    # name -> how it is reached and attached
    INSTANCES = {
      alpha = {
        address = "127.0.0.1:10809";
        device = "/dev/nbd0";
      };
      # Unix socket only: the daemon gets no IP address families at all.
      bravo = {
        address = "";
        socket = "/run/portalbd/bravo/nbd.sock";
        device = "/dev/nbd1";
      };
      # A static user instead of DynamicUser.
      charlie = {
        address = "127.0.0.1:10811";
        device = "/dev/nbd2";
        user = "portalbd-charlie";
      };
    };
  };
in
{
  name = "portalbd-multi-instance";

  nodes.machine = {
    services.portalbd.instances = builtins.mapAttrs (
      _: inst:
      {
        enable = true;
        settings = {
          device.disk_size_gb = 1;
          nbd.address = inst.address;
          nbd.socket = inst.socket or null;
        };
        attach = {
          enable = true;
          inherit (inst) device;
        };
      }
      // lib.optionalAttrs (inst ? user) { inherit (inst) user; }
    ) params.INSTANCES;

    environment.systemPackages = with pkgs; [
      socat
      tmux
      util-linux
    ];
  };

  testScript = (import ./lib.nix).testScript params ./multi-instance.py;
}
