"""What every portalbd screen shares: typed access to the app and its fleet."""

from __future__ import annotations

from typing import TYPE_CHECKING, cast

from textual.screen import Screen

if TYPE_CHECKING:
    from tui.app import PortalbdApp


class PortalbdScreen(Screen[None]):
    @property
    def portalbd(self) -> PortalbdApp:
        return cast("PortalbdApp", self.app)

    def on_mount(self) -> None:
        # Every change to the fleet re-renders the screen that is showing.
        self.watch(self.app, "revision", self._on_revision, init=True)

    def _on_revision(self, _: object = None) -> None:
        # Only the top screen: one under a modal would re-composite the dimmed
        # background every second for nothing. It catches up on resume.
        if self.is_active:
            self.render_fleet()

    def on_screen_resume(self) -> None:
        self.render_fleet()

    def render_fleet(self) -> None:
        raise NotImplementedError
