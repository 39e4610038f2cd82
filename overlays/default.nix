# The portalbd overlay: adds `slatedb` to every Python package set (it is not
# in nixpkgs) and `portalbd` itself, built with the default python3.
final: prev: {
  pythonPackagesExtensions = prev.pythonPackagesExtensions ++ [
    (pyFinal: _pyPrev: {
      slatedb = pyFinal.callPackage ./slatedb.nix { };
    })
  ];

  portalbd = final.python3Packages.callPackage ./portalbd.nix { };
}
