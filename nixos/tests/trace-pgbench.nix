# Record a pgbench run on PostgreSQL whose data directory lives on the
# kernel-attached device; recording is switched on and off over the control
# socket (TraceStart / TraceStop) so only the benchmark is in the trace.
{ pkgs, ... }:
let
  params = {
    INSTANCE = "trace";
    DEVICE = "/dev/nbd0";
    NBD_PORT = 10809;
    TRACE = "/var/lib/portalbd/trace/traces/pgbench.jsonl.zst"; # TraceStart writes only in the instance's traces/ directory
    PGDATA = "/mnt/disk/pgdata";
    SCALE = 4;
    SECONDS = 20;
  };
in
{
  name = "portalbd-trace-pgbench";

  nodes.machine = {
    virtualisation.memorySize = 2048;

    services.portalbd.instances.${params.INSTANCE} = {
      enable = true;
      settings = {
        device.disk_size_gb = 2;
        nbd.address = "127.0.0.1:${toString params.NBD_PORT}";
      };
      attach = {
        enable = true;
        device = params.DEVICE;
      };
    };

    users.users.postgres = {
      isSystemUser = true;
      group = "postgres";
    };
    users.groups.postgres = { };

    environment.systemPackages = with pkgs; [
      e2fsprogs
      postgresql
      socat
      util-linux
    ];
  };

  testScript = (import ./lib.nix).testScript params ./trace-pgbench.py;
}
