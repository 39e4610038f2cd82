# portalbd built from its pyproject.toml with nixpkgs' Python tooling.
#
# The run-time dependencies are listed once, in ./python-deps.nix. The
# package is the full install; the optional parts can be left out, e.g.
# `portalbd.override { withTrace = false; withCsi = false; }` for a daemon
# without matplotlib, numpy, py-spy, grpcio and protobuf.
{
  lib,
  pkgs,
  buildPythonApplication,
  python,
  setuptools,
  wheel,
  e2fsprogs,
  nbd,
  util-linux,
  xfsprogs,
  # the [trace] extra: portalbd-trace's charts, statistics and profiles
  withTrace ? true,
  # the [csi] extra: portalbd-csi, the Kubernetes CSI driver
  withCsi ? true,
}:

let
  root = ../.;
  pyproject = lib.importTOML (root + "/pyproject.toml");
  deps = import ./python-deps.nix;
  extras = lib.optional withTrace "trace" ++ lib.optional withCsi "csi";
  pythonDeps = lib.foldl' (acc: extra: acc // deps.extras.${extra}) deps.python extras;
  programs = lib.mapAttrsToList (_: p: pkgs.${p.attr}) (
    lib.filterAttrs (_: p: lib.elem p.extra extras) deps.programs
  );
in
buildPythonApplication {
  pname = "portalbd";
  inherit (pyproject.project) version;
  pyproject = true;

  # Only what the wheel is built from, so edits to tests, docs or Nix files
  # do not rebuild the package.
  src = lib.fileset.toSource {
    inherit root;
    fileset = lib.fileset.unions [
      (root + "/pyproject.toml")
      (root + "/portalbd")
      (root + "/tui")
      (lib.fileset.maybeMissing (root + "/README.md"))
      (lib.fileset.maybeMissing (root + "/LICENSE"))
    ];
  };

  build-system = [
    setuptools
    wheel
  ];

  dependencies = lib.mapAttrsToList (_: attr: python.pkgs.${attr}) pythonDeps;
  pythonRemoveDeps = lib.attrNames deps.programs;

  # The CSI node plugin formats, mounts and attaches volumes with the first
  # four; the trace tools profile the daemon with py-spy.
  makeWrapperArgs = [
    "--suffix PATH : ${
      lib.makeBinPath (
        [
          e2fsprogs
          nbd
          util-linux
          xfsprogs
        ]
        ++ programs
      )
    }"
  ];

  # The test suite needs NBD clients, FUSE and an S3 server; it runs in CI and
  # in the NixOS VM tests (nixos/tests/), not in the build sandbox.
  doCheck = false;

  # Importing the store loads SlateDB's patched shared library and applies the
  # binding patch, so a broken wheel or a version drift fails the build here.
  pythonImportsCheck = [
    "portalbd"
    "slatedb.uniffi"
  ];

  meta = {
    description = "Network block device whose disk lives in SlateDB on object storage";
    license = lib.licenses.asl20;
    mainProgram = "portalbd";
    platforms = lib.platforms.linux;
  };
}
