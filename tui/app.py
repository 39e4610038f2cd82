"""The portalbd TUI: one App that polls every instance, and `main()`.

The App owns the data (`Fleet`) and all control traffic; screens only render
what the App knows and ask it to act. Polling runs in one worker per instance
at a time, each request under a deadline, so a stuck daemon can delay nothing
but its own row.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import TypeVar

from rich.text import Text
from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.reactive import var
from textual.screen import Screen

from portalbd import __version__
from portalbd.control.async_client import AsyncControlClient
from portalbd.control.errors import ControlError, DaemonError, Timeout, Unreachable
from tui import __doc__ as tui_doc
from tui.config import Settings, pick_theme
from tui.discovery import scan
from tui.format import fmt_time
from tui.model import DAEMON_LOG_LINES, Fleet, Instance, LogLine, Snapshot, State, Status
from tui.screens.dialogs import ConfirmScreen, SnapshotNameScreen
from tui.view import help_rows, is_client_refusal

T = TypeVar("T")
SNAPSHOT_REREAD_S = 10.0
RENDER_DELAY_S = 0.05
Clock = Callable[[], tuple[float, float]]


def system_clock() -> tuple[float, float]:
    """(monotonic, wall) now: rates use the first, event lines show the second."""
    return time.monotonic(), time.time()


class PortalbdApp(App[None]):
    TITLE = "portalbd"
    CSS_PATH = "app.tcss"
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help"),
        Binding("f5", "refresh", "Refresh", show=False),
    ]

    # Bumped after every change to the fleet; screens watch it and re-render.
    revision: var[int] = var(0, init=False)  # a var: changing it must not repaint the app

    def __init__(
        self,
        settings: Settings | None = None,
        *,
        fleet: Fleet | None = None,
        live: bool = True,
        clock: Clock = system_clock,
    ) -> None:
        super().__init__()
        self.settings = settings or Settings()
        self.fleet = fleet if fleet is not None else Fleet()
        self.live = live
        self.clock = clock
        self._clients: dict[str, AsyncControlClient] = {}
        self._polling: set[str] = set()
        self._snapshot_wanted: set[str] = set()
        self._snapshots_fetched: dict[str, float] = {}
        self._log_wanted: set[str] = set()  # instances whose daemon log is on screen
        self._render_pending = False
        if self.settings.demo:  # made-up numbers must never pass for a real fleet
            self.title = "portalbd [DEMO: made-up data]"
        for socket in self.settings.sockets:
            self.fleet.add(socket, explicit=True)

    def on_mount(self) -> None:
        from tui.screens.overview import OverviewScreen

        theme = pick_theme(self.settings.theme)
        if theme in self.available_themes:
            self.theme = theme
        else:
            self.notify(
                f"unknown theme {theme!r}; try the Theme command", severity="error", markup=False
            )
        self.push_screen(OverviewScreen())
        if self.live:
            self.refresh_now()
            self.set_interval(self.settings.refresh_s, self.refresh_now)

    async def on_unmount(self) -> None:
        for client in self._clients.values():
            await client.close()

    # --- polling -----------------------------------------------------------

    def refresh_now(self) -> None:
        """Look for new sockets, then start a poll of every instance not already being polled."""
        if self.settings.discover:
            _, wall = self.clock()
            for socket in scan(self.settings.roots):
                inst, new = self.fleet.add(socket)
                if new:
                    inst.log(wall, "info", f"found {socket}")
        for inst in self.fleet:
            self.poll(inst)
        self.changed()

    def poll(self, inst: Instance, *, snapshots: bool = False) -> None:
        if not self.live:
            return  # showing a fixed fleet (tests, screenshots)
        if snapshots:
            self._snapshot_wanted.add(inst.key)
        if inst.key in self._polling:
            return  # the previous poll is still inside its deadline
        self._polling.add(inst.key)
        self.run_worker(self._poll(inst), group="poll", exit_on_error=False)

    async def _poll(self, inst: Instance) -> None:
        client = self._clients.get(inst.key)
        if client is None:
            client = self._clients[inst.key] = self._client(inst, self.settings.status_timeout_s)
        try:
            status = Status.from_json(await client.status())
            t, wall = self.clock()
            inst.record_status(t, wall, status)
            wanted = inst.key in self._snapshot_wanted
            known = inst.snapshots
            # The count catches most changes made elsewhere (portalctl, CSI);
            # the periodic re-read catches a delete plus a create in between.
            stale = t - self._snapshots_fetched.get(inst.key, -1e9) > SNAPSHOT_REREAD_S
            if wanted or stale or known is None or len(known) != status.snapshot_count:
                self._snapshot_wanted.discard(inst.key)
                inst.set_snapshots([Snapshot.from_json(s) for s in await client.snapshot_list()])
                self._snapshots_fetched[inst.key] = t
            if inst.key in self._log_wanted and inst.daemon_log_note is None:
                await self._fetch_log(inst, client)
        except Timeout as exc:
            inst.record_failure(self.clock()[1], State.UNRESPONSIVE, f"unresponsive: {exc}")
        except Unreachable as exc:
            inst.record_failure(self.clock()[1], State.DOWN, str(exc))
        except ControlError as exc:
            inst.record_failure(self.clock()[1], State.UNRESPONSIVE, f"bad answer: {exc}")
        except Exception as exc:  # a bug here must not take the whole UI down
            inst.record_failure(self.clock()[1], State.UNRESPONSIVE, f"internal error: {exc!r}")
        finally:
            self._polling.discard(inst.key)
            self.changed()

    async def _fetch_log(self, inst: Instance, client: AsyncControlClient) -> None:
        """What the daemon logged since the last fetch; an older daemon gets a note, once."""
        try:
            entries = await client.log(DAEMON_LOG_LINES, inst.daemon_log_seq)
        except DaemonError as exc:
            if "unknown request" in str(exc):
                # Asked again only after a restart (it may be an upgrade).
                inst.daemon_log_note = (
                    "this daemon is older than the Log request and sends no log: "
                    "read its stderr (the journal under systemd)"
                )
            else:
                inst.daemon_log_note = f"the daemon refused to send its log: {exc}"
            return
        lines = [LogLine.from_json(e) for e in entries]
        inst.add_daemon_log([line for line in lines if line is not None])

    def want_log(self, inst: Instance, wanted: bool) -> None:
        """Fetch `inst`'s daemon log on every poll while it is shown (and once now)."""
        if wanted:
            self._log_wanted.add(inst.key)
            inst.daemon_log_note = None  # ask again: the daemon may have been upgraded
            self.poll(inst)
        else:
            self._log_wanted.discard(inst.key)

    def changed(self) -> None:
        """Ask for one re-render soon; many polls finishing together cost one render."""
        if not self._render_pending:
            self._render_pending = True
            self.set_timer(RENDER_DELAY_S, self._bump)

    def _bump(self) -> None:
        self._render_pending = False
        self.revision += 1

    def action_refresh(self) -> None:
        for inst in self.fleet:
            self._snapshot_wanted.add(inst.key)
        self.refresh_now()

    # --- operations --------------------------------------------------------

    @staticmethod
    def _client(inst: Instance, timeout: float) -> AsyncControlClient:
        """Messages leave the path out: the TUI shows each one next to its instance."""
        return AsyncControlClient(inst.socket, timeout, name_socket=False)

    async def _call(self, inst: Instance, op: Callable[[AsyncControlClient], Awaitable[T]]) -> T:
        """Run one operation on its own connection, so polling is not queued behind it."""
        async with self._client(inst, self.settings.action_timeout_s) as client:
            return await op(client)

    def _failed(self, inst: Instance, what: str, exc: BaseException) -> None:
        message = str(exc) if isinstance(exc, ControlError) else f"internal error: {exc!r}"
        inst.log(self.clock()[1], "error", f"{what} failed: {message}")
        self.notify(
            message, title=f"{inst.name}: {what} failed", severity="error", timeout=8, markup=False
        )
        self.changed()

    def _done(self, inst: Instance, text: str) -> None:
        inst.log(self.clock()[1], "info", text)
        self.notify(text, title=inst.name, markup=False)
        self.poll(inst, snapshots=True)
        self.changed()

    def _can_act(self, inst: Instance, what: str) -> bool:
        if inst.state is State.UP:
            return True
        self.notify(
            f"{inst.name} is {inst.state.value}: cannot {what}",
            severity="warning",
            timeout=5,
            markup=False,
        )
        return False

    def ask_create_snapshot(self, inst: Instance) -> None:
        if not self._can_act(inst, "create a snapshot"):
            return
        existing = [s.name for s in inst.snapshots or ()]
        suggestion = time.strftime("snap-%Y%m%d-%H%M%S", time.localtime(self.clock()[1]))

        def answered(name: str | None) -> None:
            if name:
                self.run_worker(self._create(inst, name), group="action", exit_on_error=False)

        self.push_screen(SnapshotNameScreen(inst.name, existing, suggestion), answered)

    async def _create(self, inst: Instance, name: str) -> None:
        try:
            await self._call(inst, lambda c: c.snapshot_create(name))
        except Exception as exc:
            self._failed(inst, f"snapshot {name}", exc)
        else:
            self._done(inst, f"snapshot {name} created")

    def ask_delete_snapshot(self, inst: Instance, name: str) -> None:
        if not self._can_act(inst, "delete a snapshot"):
            return
        snap = next((s for s in inst.snapshots or () if s.name == name), None)
        taken = f" (taken {fmt_time(snap.created_at)})" if snap else ""
        body = Text.assemble(
            "Deletes snapshot ",
            (name, "bold"),
            taken,
            " of ",
            (inst.name, "bold"),
            ". The live disk is not changed. This cannot be undone.",
        )

        def answered(yes: bool | None) -> None:
            if yes:
                self.run_worker(self._delete(inst, name), group="action", exit_on_error=False)

        self.push_screen(
            ConfirmScreen(f"Delete snapshot {name}?", body, "Delete", danger=True), answered
        )

    async def _delete(self, inst: Instance, name: str) -> None:
        try:
            await self._call(inst, lambda c: c.snapshot_delete(name))
        except Exception as exc:
            self._failed(inst, f"delete {name}", exc)
        else:
            self._done(inst, f"snapshot {name} deleted")

    def ask_restore_snapshot(self, inst: Instance, name: str) -> None:
        if not self._can_act(inst, "restore a snapshot"):
            return
        snap = next((s for s in inst.snapshots or () if s.name == name), None)
        taken = f", taken {fmt_time(snap.created_at)}" if snap else ""
        clients = inst.status.connections if inst.status else 0
        body = Text.assemble(
            "The contents of ",
            (inst.name, "bold"),
            " become those of snapshot ",
            (name, "bold"),
            f"{taken}. Everything written since is discarded from the live disk; "
            "all snapshots, newer ones included, are kept.",
        )
        if clients:
            body.append(
                f"\n\n{clients} client{'s are' if clients != 1 else ' is'} connected: their "
                "I/O pauses during the restore and then sees the snapshot's data on the "
                "same connection. Unmount a filesystem on the disk first.",
                style="bold",
            )

        def answered(yes: bool | None) -> None:
            if yes:
                self.run_worker(
                    self._restore(inst, name, False), group="action", exit_on_error=False
                )

        self.push_screen(
            ConfirmScreen(f"Restore {inst.name} to {name}?", body, "Restore", danger=True), answered
        )

    async def _restore(self, inst: Instance, name: str, force: bool) -> None:
        try:
            await self._call(inst, lambda c: c.snapshot_restore(name, force))
        except DaemonError as exc:
            if force or not is_client_refusal(str(exc)):
                self._failed(inst, f"restore {name}", exc)
                return
            inst.log(self.clock()[1], "warning", f"restore {name} refused: {exc}")
            self.changed()
            self._offer_force(inst, name, str(exc))
        except Exception as exc:
            self._failed(inst, f"restore {name}", exc)
        else:
            self._done(inst, f"restored to snapshot {name}" + (" (forced)" if force else ""))

    def _offer_force(self, inst: Instance, name: str, reason: str) -> None:
        body = Text.assemble(
            ("The daemon refused: ", "bold"),
            reason,
            "\n\nForcing makes the daemon let the clients' requests in flight finish, "
            "disconnect every client, flush what they wrote to storage, then swap the disk "
            "to the snapshot. Their devices see the connection drop (I/O errors until they "
            "reconnect) rather than data changing silently; writes since the snapshot are "
            "discarded from the live disk. A mounted filesystem or running database loses "
            "its disk under it: unmount first.",
        )

        def answered(yes: bool | None) -> None:
            if yes:
                self.run_worker(
                    self._restore(inst, name, True), group="action", exit_on_error=False
                )

        self.push_screen(
            ConfirmScreen("Restore refused: clients attached", body, "Force restore", danger=True),
            answered,
        )

    # --- help --------------------------------------------------------------

    def action_help(self) -> None:
        """Every key of the screen showing (hidden ones too), from its live bindings."""
        from tui.screens.help import HelpScreen

        screen = self.screen
        if isinstance(screen, HelpScreen):
            screen.dismiss(None)
            return
        active = [a.binding for a in screen.active_bindings.values() if a.enabled]
        bindings = [
            (self.get_key_display(b), b.action, b.description, b.show)
            for b in active
            if not b.system
        ]
        rows = help_rows(bindings)
        if self.ENABLE_COMMAND_PALETTE:  # a system binding, so not in the list above
            palette = self.get_key_display(Binding(self.COMMAND_PALETTE_BINDING, ""))
            rows.append((palette, "Command palette: every action by name, and the theme"))
        self.push_screen(HelpScreen(screen.sub_title or self.title, rows))

    # --- command palette ---------------------------------------------------

    def get_system_commands(self, screen: Screen[object]) -> Iterable[SystemCommand]:
        """Every shown key binding of the current screen is also a palette command."""
        seen: set[str] = set()
        for active in screen.active_bindings.values():
            binding = active.binding
            if not binding.show or not binding.description or not active.enabled:
                continue
            if binding.action in seen or binding.action in ("quit", "command_palette"):
                continue
            seen.add(binding.action)
            node, action = active.node, binding.action
            yield SystemCommand(
                binding.description,
                f"{binding.description} (key: {self.get_key_display(binding)})",
                lambda node=node, action=action: self.call_later(self.run_action, action, node),
            )
        yield from super().get_system_commands(screen)


def parse_args(argv: list[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(
        prog="portalbd-tui",
        description=(tui_doc or "").strip()
        + " Instances are found under /run/portalbd/*/ and $XDG_RUNTIME_DIR/portalbd/*/.",
    )
    parser.add_argument("--version", action="version", version=f"portalbd-tui {__version__}")
    parser.add_argument(
        "--socket",
        action="append",
        type=Path,
        default=[],
        metavar="PATH",
        help="a control socket to watch besides the discovered ones (repeatable)",
    )
    parser.add_argument("--no-discover", action="store_true", help="watch only the --socket paths")
    parser.add_argument(
        "--refresh", type=float, default=1.0, metavar="SECONDS", help="poll interval (1)"
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=3.0,
        metavar="SECONDS",
        help="a daemon slower than this to answer is shown unresponsive (3)",
    )
    parser.add_argument(
        "--demo",
        action="store_true",
        help="show a made-up fleet instead of real instances (to try the interface)",
    )
    parser.add_argument(
        "--theme",
        default="auto",
        help="auto (follow the terminal's background), dark, light, ansi, or a Textual theme",
    )
    args = parser.parse_args(argv)
    if args.refresh <= 0 or args.timeout <= 0:
        parser.error("--refresh and --timeout must be positive")
    if args.no_discover and not args.socket:
        parser.error("--no-discover needs at least one --socket")
    return Settings(
        demo=args.demo,
        sockets=tuple(p.absolute() for p in args.socket),
        discover=not args.no_discover,
        refresh_s=args.refresh,
        status_timeout_s=args.timeout,
        theme=args.theme,
    )


def main(argv: list[str] | None = None) -> None:
    settings = parse_args(argv)
    if settings.demo:
        from tui.demo import demo_fleet

        PortalbdApp(settings, fleet=demo_fleet(), live=False).run()
    else:
        PortalbdApp(settings).run()


if __name__ == "__main__":
    main()
