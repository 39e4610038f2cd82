# SIGKILL the daemon while its disk lives in S3 (MinIO from nixpkgs): every
# write flushed before the crash is intact afterwards, blocks written without
# a flush are either old or new but never torn, and systemd restarts the
# daemon and re-attaches the kernel device on its own.
{ pkgs, ... }:
let
  params = {
    INSTANCE = "crash";
    DEVICE = "/dev/nbd0";
    NBD_PORT = 10809;
    BUCKET = "portalbd";
    MINIO_PORT = 9000;
    MINIO_USER = "minioadmin";
    MINIO_PASSWORD = "minioadmin";
    BLOCK_SIZE = 65536;
  };
  endpoint = "http://127.0.0.1:${toString params.MINIO_PORT}";
in
{
  name = "portalbd-crash-recovery";

  nodes.machine =
    { lib, ... }:
    {
      virtualisation.memorySize = 2048;

      services.minio = {
        enable = true;
        listenAddress = "127.0.0.1:${toString params.MINIO_PORT}";
        rootCredentialsFile = pkgs.writeText "minio-credentials" ''
          MINIO_ROOT_USER=${params.MINIO_USER}
          MINIO_ROOT_PASSWORD=${params.MINIO_PASSWORD}
        '';
      };

      services.portalbd.instances.${params.INSTANCE} = {
        enable = true;
        settings = {
          device = {
            disk_size_gb = 1;
            block_size = params.BLOCK_SIZE;
          };
          nbd.address = "127.0.0.1:${toString params.NBD_PORT}";
          storage.url = "s3://${params.BUCKET}/crash";
          lsm.flush_interval_ms = 100;
        };
        # Test credentials only; real ones belong in a file outside the store.
        environmentFile = pkgs.writeText "portalbd-s3.env" ''
          AWS_ACCESS_KEY_ID=${params.MINIO_USER}
          AWS_SECRET_ACCESS_KEY=${params.MINIO_PASSWORD}
          AWS_ENDPOINT=${endpoint}
          AWS_REGION=us-east-1
          AWS_ALLOW_HTTP=true
        '';
        attach = {
          enable = true;
          device = params.DEVICE;
        };
      };

      # The bucket is created by the test script first.
      systemd.services."portalbd-${params.INSTANCE}" = {
        wantedBy = lib.mkForce [ ];
        after = [ "minio.service" ];
      };
      systemd.services."portalbd-${params.INSTANCE}-attach".wantedBy = lib.mkForce [ ];

      environment.systemPackages = with pkgs; [
        e2fsprogs
        minio-client
        socat
        util-linux
      ];
    };

  testScript = (import ./lib.nix).testScript params ./crash-recovery.py;
}
