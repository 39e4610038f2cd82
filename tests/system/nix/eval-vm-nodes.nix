# The portalbd part of every node of every VM test, evaluated through the
# module as eval-module.nix does: tests/system/test_nix.py checks that no
# assertion fails and that the daemon accepts every rendered config. Only
# `services.portalbd` of a node is taken, so the rest of the node (other
# services, packages) is never evaluated.
{ nixpkgsLib }:
let
  lib = import nixpkgsLib;
  # What the tests' portalbd settings use of pkgs.
  pkgs.writeText = name: _text: "/nix/store/00000000000000000000000000000000-${name}";
  tests = lib.filterAttrs (name: _: lib.hasSuffix ".nix" name && name != "lib.nix") (
    builtins.readDir ../../../nixos/tests
  );
  portalbdOf =
    node:
    let
      value =
        if lib.isFunction node then
          node {
            inherit lib pkgs;
            config = { };
          }
        else
          node;
    in
    value.services.portalbd or null;
  evaluate =
    file:
    let
      test = import (../../../nixos/tests + "/${file}") { inherit lib pkgs; };
      nodes = lib.filterAttrs (_: v: v != null) (lib.mapAttrs (_: portalbdOf) test.nodes);
    in
    lib.mapAttrs (
      _: portalbd:
      import ./eval-module.nix {
        inherit nixpkgsLib;
        configuration = {
          services.portalbd = portalbd;
        };
      }
    ) nodes;
in
lib.mapAttrs' (file: _: lib.nameValuePair (lib.removeSuffix ".nix" file) (evaluate file)) tests
