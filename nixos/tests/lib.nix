# Helpers for the VM tests. Builtins only (no nixpkgs), so CI can evaluate
# the same code with a bare `nix-instantiate` (tests/system/test_nix.py).
rec {
  # A Nix value as a Python literal: null, bools, ints, floats, strings (a
  # JSON string is a valid Python string literal), lists and attribute sets.
  pythonLiteral =
    value:
    if value == null then
      "None"
    else if builtins.isBool value then
      (if value then "True" else "False")
    else if builtins.isInt value || builtins.isFloat value then
      builtins.toString value
    else if builtins.isString value then
      builtins.toJSON value
    else if builtins.isList value then
      "[" + builtins.concatStringsSep ", " (map pythonLiteral value) + "]"
    else if builtins.isAttrs value then
      "{"
      + builtins.concatStringsSep ", " (
        map (k: "${builtins.toJSON k}: ${pythonLiteral value.${k}}") (builtins.attrNames value)
      )
      + "}"
    else
      throw "pythonLiteral: cannot render a ${builtins.typeOf value}";

  # The test script the driver runs: the constants the Nix side shares with
  # the script (one `NAME = literal` line each), the helpers in common.py,
  # then the test's own .py file. The .py files use these names as globals,
  # like the driver's own symbols (machine, subtest, ...); tests/system/test_nix.py
  # type-checks the assembled script against driver_stub/.
  testScript =
    params: file:
    builtins.concatStringsSep "\n" (
      [ "# Constants from the test's .nix file." ]
      ++ map (name: "${name} = ${pythonLiteral params.${name}}") (builtins.attrNames params)
      ++ [
        ""
        (builtins.readFile ./common.py)
        (builtins.readFile file)
      ]
    );

  # Whether the VM test in `file` runs on `system`: the platforms its
  # meta.platforms lists (csi-k3s: those its registry images have hashes
  # for), every platform when it lists none. Read without nixpkgs, as the
  # script is, so the flake can leave a test out before evaluating it.
  runsOn =
    system: file:
    let
      test = import file {
        pkgs = throw "pkgs";
        lib = throw "lib";
      };
    in
    builtins.elem system (test.meta.platforms or [ system ]);
}
