# SlateDB's official Python binding, from its PyPI manylinux wheel.
#
# The wheel carries a prebuilt Rust library (libslatedb_uniffi.so) that links
# only against glibc and libgcc_s; autoPatchelfHook points it at the Nix store
# copies. portalbd pins this exact version (portalbd/store/uniffi_patch.py
# patches the generated bindings and refuses any other version).
{
  lib,
  stdenv,
  buildPythonPackage,
  fetchPypi,
  autoPatchelfHook,
}:

let
  version = "0.17.0";

  # One wheel per platform; hashes of the files on PyPI.
  wheels = {
    x86_64-linux = {
      platform = "manylinux_2_17_x86_64.manylinux2014_x86_64";
      hash = "sha256-eSUvhZMxAQ759lMrGiRNuNxuKTZyNtAi545vzRLTVgo=";
    };
    aarch64-linux = {
      platform = "manylinux_2_17_aarch64.manylinux2014_aarch64";
      hash = "sha256-YzZrWoleSzzUcpX9TOfrKiElgEs0tUjBizp07e00Riw=";
    };
  };

  system = stdenv.hostPlatform.system;
  wheel = wheels.${system} or (throw "slatedb ${version}: no PyPI wheel for ${system}");
in
buildPythonPackage {
  pname = "slatedb";
  inherit version;
  format = "wheel";

  src = fetchPypi {
    pname = "slatedb";
    inherit version;
    format = "wheel";
    dist = "py3";
    python = "py3";
    abi = "none";
    inherit (wheel) platform hash;
  };

  nativeBuildInputs = [ autoPatchelfHook ];
  buildInputs = [ stdenv.cc.cc.lib ];

  # Loads the shared library, so a broken patchelf fails the build.
  pythonImportsCheck = [ "slatedb.uniffi" ];

  meta = {
    description = "Python binding of SlateDB, an embedded LSM tree on object storage";
    homepage = "https://slatedb.io";
    license = lib.licenses.asl20;
    platforms = builtins.attrNames wheels;
    sourceProvenance = [ lib.sourceTypes.binaryNativeCode ];
  };
}
