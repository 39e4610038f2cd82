"""The app's behaviour on fixed data (no daemon): keys, dialogs, palette, layout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import pytest
from textual.command import CommandList, CommandPalette
from textual.pilot import Pilot
from textual.widgets import Button, Input, Label
from textual.widgets._toast import Toast

from tui.app import PortalbdApp
from tui.config import Settings
from tui.demo import demo_fleet
from tui.model import Fleet
from tui.screens.dialogs import ConfirmScreen, SnapshotNameScreen
from tui.screens.instance import InstanceScreen
from tui.screens.overview import OverviewScreen
from tui.widgets.tables import InstanceTable

Scenario = Callable[[PortalbdApp, Pilot[None]], Awaitable[None]]


@pytest.fixture(autouse=True)
def utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def run(scenario: Scenario, fleet: Fleet | None = None, size: tuple[int, int] = (100, 30)) -> None:
    app = PortalbdApp(
        Settings(discover=False, roots=(Path("/nonexistent"),), theme="dark"),
        fleet=demo_fleet() if fleet is None else fleet,
        live=False,
    )

    async def go() -> None:
        async with app.run_test(size=size, notifications=True) as pilot:
            await pilot.pause()
            await scenario(app, pilot)

    asyncio.run(go())


def toasts(app: PortalbdApp) -> list[str]:
    return [t.render().plain for t in app.screen.query(Toast)]


def test_every_binding_is_in_the_command_palette() -> None:
    async def scenario(app: PortalbdApp, pilot: Pilot[None]) -> None:
        await pilot.press("down", "enter")
        assert isinstance(app.screen, InstanceScreen)
        await pilot.press("ctrl+p")
        assert isinstance(app.screen, CommandPalette)
        await pilot.pause(0.5)
        options = app.screen.query_one(CommandList)
        prompts = [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]
        text = "\n".join(prompts)
        for description in ("New snapshot", "Delete", "Restore", "Back", "Theme", "Quit"):
            assert description in text
        # Running one from the palette is the same as pressing its key.
        await pilot.press(*"New snap")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await pilot.pause(0.3)
        assert isinstance(app.screen, SnapshotNameScreen)

    run(scenario)


def test_snapshot_name_prompt_validates_while_typing() -> None:
    async def scenario(app: PortalbdApp, pilot: Pilot[None]) -> None:
        await pilot.press("down", "c")  # from the overview, on "db"
        assert isinstance(app.screen, SnapshotNameScreen)
        name = app.screen.query_one(Input)
        problem = app.screen.query_one("#problem", Label)
        create = app.screen.query_one("#create", Button)
        assert name.value.startswith("snap-")
        for typed, message in (
            ("", "a name is required"),
            ("-x", "must start with a letter or digit (or '_')"),
            ("a b", "only letters, digits, '.', '_' and '-'"),
            ("before-upgrade", "a snapshot named 'before-upgrade' already exists"),
        ):
            name.value = typed
            await pilot.pause()
            assert str(problem.render()) == message
            assert create.disabled
            await pilot.press("enter")
            assert isinstance(app.screen, SnapshotNameScreen)  # still asking
        name.value = "fine-name"
        await pilot.pause()
        assert str(problem.render()) == "" and not create.disabled
        await pilot.press("escape")
        assert isinstance(app.screen, OverviewScreen)

    run(scenario)


def test_confirmations_default_to_cancel_and_say_what_happens() -> None:
    async def scenario(app: PortalbdApp, pilot: Pilot[None]) -> None:
        await pilot.press("down", "enter", "d")  # db, first snapshot: before-upgrade
        assert isinstance(app.screen, ConfirmScreen)
        body = str(app.screen.query_one(".dialog--body").render())
        assert "Deletes snapshot before-upgrade" in body and "cannot be undone" in body
        await pilot.press("enter")  # Cancel has the focus
        assert isinstance(app.screen, InstanceScreen)
        await pilot.press("r")
        body = str(app.screen.query_one(".dialog--body").render())
        assert "become those of snapshot before-upgrade" in body
        assert "2 clients are connected" in body
        await pilot.press("n")
        assert isinstance(app.screen, InstanceScreen)

    run(scenario)


def test_actions_on_a_down_instance_are_refused_with_a_reason() -> None:
    async def scenario(app: PortalbdApp, pilot: Pilot[None]) -> None:
        await pilot.press("c")  # the cursor starts on "backup", which is down
        await pilot.pause()
        assert isinstance(app.screen, OverviewScreen)
        assert any("backup is down: cannot create a snapshot" in t for t in toasts(app))
        await pilot.press("enter", "r")
        await pilot.pause()
        assert any("No snapshot selected" in t for t in toasts(app))

    run(scenario)


def test_columns_follow_the_width() -> None:
    async def scenario(app: PortalbdApp, pilot: Pilot[None]) -> None:
        table = app.screen.query_one(InstanceTable)
        assert "url" not in {c.value for c in table.columns}
        await pilot.resize_terminal(200, 40)
        await pilot.pause()
        assert "url" in {c.value for c in table.columns}
        assert table.get_cell_at(table.cursor_coordinate).plain == "backup"

    run(scenario)


def test_empty_state_says_where_it_looks() -> None:
    async def scenario(app: PortalbdApp, pilot: Pilot[None]) -> None:
        text = str(app.screen.query_one("#empty").render())
        assert "No portalbd instances found" in text

    run(scenario, fleet=Fleet())


def test_event_log_appends_only_what_is_new_even_past_its_capacity() -> None:
    from tui.model import EVENT_LINES
    from tui.widgets.event_log import EventLog

    async def scenario(app: PortalbdApp, pilot: Pilot[None]) -> None:
        await pilot.press("down", "enter")
        log = app.screen.query_one(EventLog)
        db = next(i for i in app.fleet if i.name == "db")
        assert len(log.lines) == 3
        for n in range(EVENT_LINES + 50):  # more than the deque keeps
            db.log(1_764_000_100.0 + n, "info", f"event {n}")
        log.show(db)
        await pilot.pause()
        texts = [line.text for line in log.lines]
        assert texts[-1].endswith(f"event {EVENT_LINES + 49}")
        assert len(texts) == EVENT_LINES  # the log's own cap; oldest dropped
        assert sum(t.endswith("event 60") for t in texts) == 1  # nothing written twice

    run(scenario)


def test_screenshot_writer_exports_both_screens(tmp_path: Path) -> None:
    from tui.screenshots import main as write_screenshots

    write_screenshots([str(tmp_path), "--size", "100x30"])
    for name in ("overview", "instance"):
        svg = (tmp_path / f"tui-{name}.svg").read_text()
        assert svg.startswith("<svg") and svg.rstrip().endswith("</svg>")
        assert "portalbd-tui:" in svg.replace("&#160;", " ")


def test_question_mark_lists_every_key_of_the_screen() -> None:
    from tui.screens.help import HelpScreen

    def listed(app: PortalbdApp) -> dict[str, str]:
        assert isinstance(app.screen, HelpScreen)
        return dict(app.screen.rows)

    async def scenario(app: PortalbdApp, pilot: Pilot[None]) -> None:
        await pilot.press("down", "question_mark")
        await pilot.pause()
        rows = listed(app)
        for keys, what in [
            ("⏎", "Open"),
            ("c", "Snapshot"),
            ("r/f5", "Refresh"),
            ("?", "Help"),
            ("^q q", "Quit"),
            ("↓ j", "Cursor down"),  # the footer's hidden keys too
            ("^p", "Command palette: every action by name, and the theme"),
        ]:
            assert rows.get(keys) == what, (keys, rows)
        assert list(rows)[:3] == ["⏎", "c", "r/f5"]  # the screen's own keys first
        await pilot.press("escape")
        assert isinstance(app.screen, OverviewScreen)
        await pilot.press("enter", "question_mark")
        await pilot.pause()
        rows = listed(app)
        for keys, what in [
            ("esc", "Back"),
            ("c", "New snapshot"),
            ("d", "Delete"),
            ("r", "Restore"),
            ("f5", "Refresh"),
        ]:
            assert rows.get(keys) == what, (keys, rows)
        await pilot.press("question_mark")  # ? again closes it
        assert isinstance(app.screen, InstanceScreen)
        await pilot.press("c", "question_mark")  # typed into a prompt, it is a character
        await pilot.pause()
        assert isinstance(app.screen, SnapshotNameScreen)
        assert app.screen.query_one(Input).value.endswith("?")

    run(scenario)


def test_footer_shows_f5_and_help() -> None:
    from textual.widgets._footer import FooterKey

    def keys(app: PortalbdApp) -> dict[str, str]:
        return {k.key: k.description for k in app.screen.query(FooterKey)}

    async def scenario(app: PortalbdApp, pilot: Pilot[None]) -> None:
        assert keys(app)["r"] == "Refresh" and "r/f5" in str(app.screen.active_bindings["r"])
        assert keys(app)["question_mark"] == "Help"
        await pilot.press("down", "enter")
        await pilot.pause()
        assert keys(app)["f5"] == "Refresh" and keys(app)["question_mark"] == "Help"

    run(scenario, size=(80, 24))


def test_demo_mode_says_so_in_the_header() -> None:
    from textual.widgets import Header

    async def go() -> None:
        app = PortalbdApp(Settings(demo=True, discover=False), fleet=demo_fleet(), live=False)
        async with app.run_test(size=(80, 24)) as pilot:
            await pilot.pause()
            assert app.title == "portalbd [DEMO: made-up data]"
            assert app.screen.query_one(Header).screen_title == app.title

    asyncio.run(go())
    assert PortalbdApp(Settings(discover=False)).title == "portalbd"


def test_events_wrap_at_the_panel_width_and_rewrap_on_resize() -> None:
    from tui.widgets.event_log import EventLog

    fleet = demo_fleet()
    db = next(i for i in fleet if i.name == "db")
    db.log(1_764_000_100.0, "error", "snapshot x failed: " + "word " * 40 + "THE-END")

    async def scenario(app: PortalbdApp, pilot: Pilot[None]) -> None:
        await pilot.press("down", "enter")
        await pilot.pause()
        log = app.screen.query_one(EventLog)

        def widest() -> int:
            assert "".join(line.text for line in log.lines).endswith("word THE-END")
            return max(line.cell_length for line in log.lines)

        narrow = log.scrollable_content_region.width
        assert narrow < 78 and widest() <= narrow  # RichLog's default wrapped at 78
        await pilot.resize_terminal(240, 40)
        await pilot.pause()
        wide = log.scrollable_content_region.width
        assert wide > 78 and 78 < widest() <= wide  # wrapped again, at the new width

    run(scenario, fleet=fleet, size=(120, 40))


def test_slash_filters_the_overview() -> None:
    async def scenario(app: PortalbdApp, pilot: Pilot[None]) -> None:
        table = app.screen.query_one(InstanceTable)

        def shown() -> list[str]:
            return [str(table.get_row(key)[0]) for key in table.rows]

        assert shown() == ["backup", "db", "scratch"]
        await pilot.press("slash", *"S3:")  # case-insensitive, the storage URL counts
        await pilot.pause()
        assert shown() == ["db"] and app.screen.sub_title == "3 instances, 2 up, 1 shown"
        await pilot.press("enter")  # keeps the filter, back on the table
        await pilot.pause()
        assert app.focused is table and shown() == ["db"]
        await pilot.press("enter")  # now it opens the match
        await pilot.pause()
        assert isinstance(app.screen, InstanceScreen)
        await pilot.press("escape", "slash", *"zz")
        await pilot.pause()
        assert "No instance matches 'zz'" in str(app.screen.query_one("#empty").render())
        await pilot.press("escape")  # clears it
        await pilot.pause()
        assert shown() == ["backup", "db", "scratch"] and app.focused is table
        await pilot.press("slash", *"down")  # the state counts too
        await pilot.pause()
        assert shown() == ["backup"]

    run(scenario)


def test_the_force_offer_says_the_daemon_flushes_and_disconnects() -> None:
    async def scenario(app: PortalbdApp, pilot: Pilot[None]) -> None:
        db = next(i for i in app.fleet if i.name == "db")
        app._offer_force(db, "before-upgrade", "refusing to restore: 2 clients connected")
        await pilot.pause()
        assert isinstance(app.screen, ConfirmScreen)
        body = " ".join(str(app.screen.query_one(".dialog--body").render()).split())
        assert "The daemon refused: refusing to restore: 2 clients connected" in body
        for said in ("requests in flight finish", "disconnect every client", "flush what"):
            assert said in body, body
        await pilot.press("enter")  # Cancel has the focus: nothing is forced
        assert not isinstance(app.screen, ConfirmScreen)

    run(scenario)


def test_s_cycles_the_sort_column_with_an_arrow_and_a_header_click_sorts() -> None:
    from textual.widgets.data_table import ColumnKey

    from tui.view import SORT_KEYS

    async def scenario(app: PortalbdApp, pilot: Pilot[None]) -> None:
        table = app.screen.query_one(InstanceTable)

        def shown() -> list[str]:
            return [str(table.get_row(key)[0]) for key in table.rows]

        def header(key: str) -> str:
            return str(table.columns[ColumnKey(key)].label)

        assert shown() == ["backup", "db", "scratch"] and header("name") == "Instance ▲"
        assert table.border_subtitle == "sorted by name ▲"
        await pilot.press("s", "s")  # state, then size: biggest first, the down one last
        await pilot.pause()
        assert shown() == ["db", "scratch", "backup"]
        assert header("size") == "Size ▼" and header("name") == "Instance"
        assert table.border_subtitle == "sorted by size ▼"
        await pilot.press("S")  # reversed: smallest first, still no value last
        await pilot.pause()
        assert shown() == ["scratch", "db", "backup"] and header("size") == "Size ▲"
        await pilot.press(*"s" * (len(SORT_KEYS) - 2))  # round to name again
        await pilot.pause()
        assert header("name") == "Instance ▲" and shown() == ["backup", "db", "scratch"]
        # A click on a header sorts by that column.
        x = sum(table.columns[ColumnKey(k)].get_render_width(table) for k in ("name", "state"))
        await pilot.click(InstanceTable, offset=(x + 3, 1))
        await pilot.pause()
        assert header("size") == "Size ▼" and shown() == ["db", "scratch", "backup"]
        await pilot.press("question_mark")  # and ? lists both keys
        await pilot.pause()
        rows = dict(getattr(app.screen, "rows", []))
        assert rows.get("s") == "Sort" and rows.get("S") == "Reverse the sort", rows

    run(scenario)


def test_l_shows_the_daemons_log_wrapped_at_the_panel_width() -> None:
    from tui.model import LogLine
    from tui.widgets.event_log import EventLog

    fleet = demo_fleet()
    db = next(i for i in fleet if i.name == "db")
    long = "flush took long: " + "detail " * 30 + "THE-END"
    db.add_daemon_log(
        [
            LogLine(seq=10, wall=1_764_000_100.0, level="info", logger="portalbd", message="up"),
            LogLine(seq=11, wall=1_764_000_101.0, level="warning", logger="x", message=long),
        ]
    )
    db.add_daemon_log([LogLine(seq=11, wall=0.0, level="info", message="again")])  # held: skipped

    async def scenario(app: PortalbdApp, pilot: Pilot[None]) -> None:
        await pilot.press("down", "enter")
        await pilot.pause()
        log = app.screen.query_one(EventLog)
        assert log.border_title == "Events" and log.border_subtitle == "l: daemon log"
        await pilot.press("l")
        await pilot.pause()
        text = [line.text for line in log.lines]
        assert log.border_title == "Daemon log" and log.border_subtitle == "l: events"
        up = text.index("16:01:40 info portalbd: up")
        assert len(db.daemon_log) == 6 and "again" not in "".join(text)
        assert "".join(text[up + 1 :]).endswith("detail THE-END") and len(text) > up + 3  # wrapped
        assert max(line.cell_length for line in log.lines) <= log.scrollable_content_region.width
        await pilot.press("l")
        await pilot.pause()
        assert log.border_title == "Events" and "snapshot nightly" in log.lines[1].text
        await pilot.press("question_mark")  # not in the footer, but in ? help
        await pilot.pause()
        assert dict(getattr(app.screen, "rows", [])).get("l") == "Daemon log / events"

    run(scenario, fleet=fleet, size=(100, 30))


def test_a_daemon_without_the_log_request_gets_a_note_not_a_crash(tmp_path: Path) -> None:
    """An older daemon (a stand-in speaking its protocol) answers `Log` with an unknown request."""
    import json

    from tui.widgets.event_log import EventLog

    path = tmp_path / "old" / "control.sock"
    path.parent.mkdir()
    asked: list[str] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            request = json.loads(line)
            asked.append(request if isinstance(request, str) else next(iter(request)))
            if request == "Status":
                reply: object = {"Status": {"instance": "old", "pid": 1, "uptime_s": 5.0}}
            elif request == "SnapshotList":
                reply = {"SnapshotList": []}
            else:
                reply = {"Error": f"unknown request {asked[-1]!r} (known: SnapshotList, Status)"}
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()

    async def go() -> None:
        server = await asyncio.start_unix_server(serve, str(path))
        settings = Settings(sockets=(path,), discover=False, refresh_s=0.2, theme="dark")
        app = PortalbdApp(settings)
        async with server, app.run_test(size=(100, 30)) as pilot:
            for _ in range(50):
                await pilot.pause(0.05)
                if app.fleet.get(str(path)) and app.fleet.get(str(path)).status:  # type: ignore[union-attr]
                    break
            await pilot.press("enter", "l")
            for _ in range(50):
                await pilot.pause(0.05)
                if "Log" in asked:
                    break
            await pilot.pause(0.5)  # more polls: the note stays, Log is not asked again
            log = app.screen.query_one(EventLog)
            shown = " ".join(line.text for line in log.lines)
            assert "older than the Log request" in shown, shown
            assert asked.count("Log") == 1 and app.fleet.get(str(path)).state.value == "up"  # type: ignore[union-attr]

    asyncio.run(go())
