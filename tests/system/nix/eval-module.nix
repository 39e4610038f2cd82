# Evaluates nixos/modules/portalbd.nix with nixpkgs' module system but
# without a nixpkgs checkout: `pkgs`, `utils` and the handful of NixOS
# options the module sets are stubs. Used by tests/system/test_nix.py when a copy
# of nixpkgs' lib/ is at hand (PORTALBD_NIXPKGS_LIB).
#
# Returns the failed assertion messages, warnings, and every generated unit
# with the rendered config (as a Nix value) in place of its store path.
{
  nixpkgsLib,
  configuration,
}:
let
  lib = import nixpkgsLib;
  inherit (lib) mkOption types;

  fakePackage = name: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
    outputs = [ "out" ];
    meta = { };
  };

  pkgs = {
    portalbd = fakePackage "portalbd";
    nbd = fakePackage "nbd";
    formats.toml = _: {
      type = types.attrsOf types.anything;
      generate = name: value: {
        __toString = _: "/nix/store/00000000000000000000000000000000-${name}";
        rendered = value;
      };
    };
  };

  # Keep ExecStart= as a list so the test can look at each argument.
  utils.escapeSystemdExecArgs = args: args;

  anything = mkOption {
    type = types.anything;
    default = { };
  };
  listOfAnything = mkOption {
    type = types.listOf types.anything;
    default = [ ];
  };

  nixosStubs = {
    options = {
      assertions = listOfAnything;
      warnings = listOfAnything;
      environment.systemPackages = listOfAnything;
      boot.kernelModules = listOfAnything;
      boot.extraModprobeConfig = mkOption {
        type = types.lines;
        default = "";
      };
      networking.firewall.allowedTCPPorts = listOfAnything;
      users.users = mkOption {
        type = types.attrsOf types.anything;
        default = { };
      };
      users.groups = mkOption {
        type = types.attrsOf types.anything;
        default = { };
      };
      systemd.services = mkOption {
        type = types.attrsOf types.anything;
        default = { };
      };
    };
  };

  evaluated = lib.evalModules {
    modules = [
      nixosStubs
      ../../../nixos/modules/portalbd.nix
      configuration
      {
        _module.args = {
          inherit pkgs utils;
        };
      }
    ];
  };
  c = evaluated.config;

  plain =
    value:
    if lib.isAttrs value && value ? rendered then
      { config = value.rendered; }
    else if lib.isAttrs value && value ? outPath then
      value.name
    else if lib.isAttrs value then
      lib.mapAttrs (_: plain) value
    else if lib.isList value then
      map plain value
    else
      value;
in
{
  failed = map (a: a.message) (lib.filter (a: !a.assertion) c.assertions);
  inherit (c) warnings;
  services = plain c.systemd.services;
  packages = map (p: p.name) c.environment.systemPackages;
  kernelModules = c.boot.kernelModules;
  modprobe = c.boot.extraModprobeConfig;
  firewall = c.networking.firewall.allowedTCPPorts;
  users = lib.attrNames c.users.users;
  groups = lib.attrNames c.users.groups;
}
