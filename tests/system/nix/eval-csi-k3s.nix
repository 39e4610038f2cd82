# Evaluates nixos/tests/csi-k3s.nix for one platform with stand-in packages:
# the dockerTools builders return their arguments, so tests/system/test_nix.py
# sees which images k3s is given, with which architecture and hash, and the
# manifests that refer to them. Builtins only; nothing is built or fetched.
{ system }:
let
  fake = name: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
  };
  image = kind: args: {
    inherit kind;
    name = args.finalImageName or args.imageName or args.name;
    tag = args.finalImageTag or args.tag;
    arch = args.arch or null;
    hash = args.hash or null;
    entrypoint = args.config.Entrypoint or null;
  };
  pkgs = {
    stdenv.hostPlatform.system = system;
    dockerTools = {
      pullImage = image "pull";
      buildLayeredImage = image "layered";
    };
  }
  // builtins.listToAttrs (
    map (name: {
      inherit name;
      value = fake name;
    }) [ "bashInteractive" "busybox" "coreutils" "e2fsprogs" "k3s" "nbd" "portalbd" "tini" "util-linux" ]
  );
  test = import ../../../nixos/tests/csi-k3s.nix {
    inherit pkgs;
    lib = throw "lib";
  };
  machine = test.nodes.machine;
in
{
  inherit (machine.services.k3s) images extraFlags;
  manifests = machine.environment.etc."portalbd-csi/manifests.json".text;
  pod = machine.environment.etc."portalbd-csi/pod.json".text;
  platforms = test.meta.platforms;
}
