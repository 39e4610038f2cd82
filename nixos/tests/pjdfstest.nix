# pjdfstest, the POSIX filesystem conformance suite (chmod, chown, link,
# mkdir, open, rename, rmdir, symlink, truncate, unlink, ... ), on an ext4
# on a portalbd device attached through the kernel client.
{ pkgs, ... }:
let
  params = {
    INSTANCE = "pjd";
    DEVICE = "/dev/nbd0";
    NBD_PORT = 10809;
    MOUNT = "/mnt/pjd";
    # the suite: its tests/ and the pjdfstest binary they find two levels up
    SUITE = "/etc/pjdfstest";
  };

  # Not in nixpkgs. The tests are shell scripts that `prove` runs; each
  # locates the binary as tests/../pjdfstest, so both are installed side by
  # side. tests/conf detects the filesystem with `df -PT .`.
  pjdfstest = pkgs.stdenv.mkDerivation {
    pname = "pjdfstest";
    version = "0-unstable-03eb257";
    src = pkgs.fetchFromGitHub {
      owner = "pjd";
      repo = "pjdfstest";
      rev = "03eb25706d8dbf3611c3f820b45b7a5e09a36c06";
      hash = "sha256-CUl9Hlz8Y/6mGTnm5CHNJOOJjda0sv7yPp1meoaJEN8=";
    };
    nativeBuildInputs = [ pkgs.autoreconfHook ];
    installPhase = ''
      runHook preInstall
      install -D -m 0755 pjdfstest $out/pjdfstest
      cp -r tests $out/tests
      runHook postInstall
    '';
    meta.license = pkgs.lib.licenses.bsd2;
  };
in
{
  name = "portalbd-pjdfstest";

  nodes.machine = {
    virtualisation.memorySize = 2048;

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

    environment.etc.pjdfstest.source = pjdfstest;
    environment.systemPackages = with pkgs; [
      e2fsprogs
      openssl # the tests make their random names with it
      perl # prove
      socat
      util-linux
    ];
  };

  testScript = (import ./lib.nix).testScript params ./pjdfstest.py;
}
