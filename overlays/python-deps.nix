# portalbd's run-time requirements, in one place, grouped like pyproject.toml:
# `python` is `[project].dependencies`, `extras.<name>` the optional
# dependencies of that extra. The package is the full install by default
# (overlays/portalbd.nix: withTrace, withCsi). tests/system/test_nix.py fails
# when these drift apart from pyproject.toml.
{
  # PyPI name = attribute in the nixpkgs Python package set.
  python = {
    boto3 = "boto3";
    cryptography = "cryptography";
    lz4 = "lz4";
    msgspec = "msgspec";
    prometheus-client = "prometheus-client";
    sh = "sh";
    slatedb = "slatedb";
    textual = "textual";
    tomlkit = "tomlkit";
    uvloop = "uvloop";
    zstandard = "zstandard";
  };

  extras = {
    # trace analysis: charts, statistics, result schemas (and py-spy below)
    trace = {
      jsonschema = "jsonschema";
      matplotlib = "matplotlib";
      numpy = "numpy";
    };
    # the Kubernetes CSI driver
    csi = {
      grpcio = "grpcio";
      protobuf = "protobuf";
    };
  };

  # PyPI name = top-level nixpkgs package, with the extra that wants it.
  # These are programs portalbd runs (nixpkgs does not ship them as Python
  # packages): they are dropped from the wheel's requirements and put on
  # PATH instead.
  programs = {
    py-spy = {
      attr = "py-spy";
      extra = "trace";
    };
  };
}
