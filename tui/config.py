"""Settings of one TUI run, and the choice of light or dark theme."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tui.discovery import default_roots

THEME_DARK = "textual-dark"
THEME_LIGHT = "textual-light"
THEME_ALIASES = {"dark": THEME_DARK, "light": THEME_LIGHT}


@dataclass(frozen=True, kw_only=True)
class Settings:
    sockets: tuple[Path, ...] = ()
    discover: bool = True
    roots: tuple[Path, ...] = field(default_factory=lambda: tuple(default_roots()))
    refresh_s: float = 1.0
    # A status answer slower than this marks the daemon unresponsive. Generous,
    # because a daemon busy flushing to S3 is slow, not stuck.
    status_timeout_s: float = 3.0
    # Snapshot create/restore may flush and clone on object storage.
    action_timeout_s: float = 120.0
    theme: str = "auto"
    demo: bool = False


def terminal_is_light(env: Mapping[str, str] | None = None) -> bool | None:
    """What the terminal says about its background, if anything.

    `COLORFGBG` ("fg;bg", set by rxvt, Konsole, iTerm2, ...) names the
    background as an ANSI colour index: 7 and 9-15 are light, the rest dark.
    """
    env = os.environ if env is None else env
    value = env.get("COLORFGBG", "")
    if not value:
        return None
    last = value.split(";")[-1].strip()
    if not last.isdigit():
        return None
    bg = int(last)
    return bg == 7 or 9 <= bg <= 15


def pick_theme(choice: str, env: Mapping[str, str] | None = None) -> str:
    """The Textual theme for `--theme` (auto follows the terminal's background)."""
    light = bool(terminal_is_light(env))
    if choice == "ansi":  # the terminal's own palette, in its light or dark variant
        return "ansi-light" if light else "ansi-dark"
    if choice != "auto":
        return THEME_ALIASES.get(choice, choice)
    return THEME_LIGHT if light else THEME_DARK
