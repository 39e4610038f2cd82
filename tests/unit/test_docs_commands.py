"""The README and docs name only subcommands the tools have."""

from __future__ import annotations

import argparse
import re

import pytest

from portalbd.portalctl import build_parser as portalctl_parser
from portalbd.trace.cli import build_parser as trace_parser
from tests.support import REPO

VALUE_FLAGS = "(?:-i|--instance|-s|--socket|--timeout)"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def subcommands(parser: argparse.ArgumentParser) -> set[str]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


@pytest.mark.parametrize(
    ("tool", "parser"), [("portalbd-trace", trace_parser()), ("portalctl", portalctl_parser())]
)
def test_documented_subcommands_exist(tool: str, parser: argparse.ArgumentParser) -> None:
    known = subcommands(parser)
    named: set[tuple[str, str]] = set()
    for doc in DOCS:
        text = doc.read_text()
        # "portalbd-trace replay ...", and lists such as "`portalbd-trace` info/import/..."
        # command lines: at the start of a line (after "$ ") or in backticks
        start = r"(?:^\s*(?:\$ )?|`)"
        command = rf"{start}{tool} (?:{VALUE_FLAGS} [^\s`]+ |--json )*([a-z][\w-]*)"
        for match in re.finditer(command, text, re.M):
            named.add((doc.name, match.group(1)))
        for match in re.finditer(rf"`{tool}` ((?:[a-z]+/)+[a-z]+)", text):
            named.update((doc.name, word) for word in match.group(1).split("/"))
    assert named, f"no {tool} commands found in the docs"
    unknown = sorted((doc, word) for doc, word in named if word not in known)
    assert not unknown, f"{tool} has no such subcommand: {unknown}"
