"""Every console script in pyproject answers --version with its name and portalbd's version."""

from __future__ import annotations

import importlib
import tomllib

import pytest

from portalbd import __version__
from tests.support import REPO

SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_version(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    module, _, function = SCRIPTS[name].partition(":")
    main = getattr(importlib.import_module(module), function)
    with pytest.raises(SystemExit) as exited:
        code = main(["--version"])
        raise SystemExit(code)  # portalbd-csi answers without argparse and returns
    assert exited.value.code in (0, None)
    assert capsys.readouterr().out == f"{name} {__version__}\n"
