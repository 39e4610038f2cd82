# portalbd's run-time requirements, in one place: the package is the full
# install, so this is `[project].dependencies` plus the `trace` and `csi`
# extras of pyproject.toml. tests/system/test_nix.py fails when they drift apart.
{
  # PyPI name = attribute in the nixpkgs Python package set.
  python = {
    boto3 = "boto3";
    grpcio = "grpcio";
    jsonschema = "jsonschema";
    lz4 = "lz4";
    matplotlib = "matplotlib";
    msgspec = "msgspec";
    numpy = "numpy";
    prometheus-client = "prometheus-client";
    protobuf = "protobuf";
    sh = "sh";
    slatedb = "slatedb";
    textual = "textual";
    tomlkit = "tomlkit";
    uvloop = "uvloop";
    zstandard = "zstandard";
  };

  # PyPI name = top-level nixpkgs package. These are programs portalbd runs
  # (nixpkgs does not ship them as Python packages): they are dropped from
  # the wheel's requirement check and put on PATH instead.
  programs = {
    py-spy = "py-spy";
  };
}
