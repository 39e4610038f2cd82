# Evaluates overlays/portalbd.nix the way callPackage would, with nixpkgs'
# lib but stand-in packages: `buildPythonApplication` returns its arguments,
# so tests/system/test_nix.py sees which dependencies and programs each
# choice of extras brings in. Nothing is built.
{
  nixpkgsLib,
  withTrace ? true,
  withCsi ? true,
}:
let
  lib = import nixpkgsLib;
  deps = import ../../../overlays/python-deps.nix;

  fakePackage = name: {
    type = "derivation";
    inherit name;
    outPath = "/nix/store/00000000000000000000000000000000-${name}";
    outputs = [ "out" ];
    meta = { };
  };
  named = names: lib.genAttrs names fakePackage;

  pythonNames = lib.attrValues (
    deps.python // lib.foldl' (a: b: a // b) { } (lib.attrValues deps.extras)
  );

  package = import ../../../overlays/portalbd.nix {
    inherit lib withTrace withCsi;
    pkgs = named (map (p: p.attr) (lib.attrValues deps.programs));
    buildPythonApplication = args: args;
    python.pkgs = named pythonNames;
    setuptools = fakePackage "setuptools";
    wheel = fakePackage "wheel";
    e2fsprogs = fakePackage "e2fsprogs";
    nbd = fakePackage "nbd";
    util-linux = fakePackage "util-linux";
    xfsprogs = fakePackage "xfsprogs";
  };
in
{
  dependencies = map (p: p.name) package.dependencies;
  inherit (package) makeWrapperArgs pythonRemoveDeps pythonImportsCheck;
}
