"""Modal dialogs: a yes/no confirmation and the new-snapshot name prompt."""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.validation import ValidationResult, Validator
from textual.widgets import Button, Input, Label, Static

from tui.view import snapshot_name_problem

DIALOG_CSS = """
{name} {{
    align: center middle;
    background: $background 60%;
}}
{name} > Vertical {{
    width: 64;
    max-width: 100%;
    height: auto;
    border: thick $primary 80%;
    background: $surface;
    padding: 1 2;
}}
{name} .dialog--title {{ text-style: bold; width: 100%; margin-bottom: 1; }}
{name} .dialog--body {{ width: 100%; margin-bottom: 1; }}
{name} .dialog--buttons {{ height: auto; width: 100%; align-horizontal: right; }}
{name} Button {{ margin-left: 2; }}
"""


class ConfirmScreen(ModalScreen[bool]):
    """Asks before something that cannot be undone; says exactly what will happen."""

    DEFAULT_CSS = (
        DIALOG_CSS.format(name="ConfirmScreen")
        + """
    ConfirmScreen.-danger > Vertical { border: thick $error 80%; }
    """
    )
    BINDINGS = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]

    def __init__(self, title: str, body: Text | str, confirm: str, *, danger: bool = False) -> None:
        super().__init__(classes="-danger" if danger else "")
        self._title = title
        self._body = body
        self._confirm = confirm
        self._danger = danger

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(Text(self._title), classes="dialog--title")
            yield Static(self._body, classes="dialog--body")
            with Horizontal(classes="dialog--buttons"):
                yield Button("Cancel", id="no")
                yield Button(
                    self._confirm, id="yes", variant="error" if self._danger else "primary"
                )

    def on_mount(self) -> None:
        # Focus the safe choice: a stray Enter must not destroy data.
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        self.dismiss(event.button.id == "yes")

    def action_answer(self, answer: bool) -> None:
        self.dismiss(answer)


class _SnapshotName(Validator):
    def __init__(self, existing: Sequence[str]) -> None:
        super().__init__()
        self._existing = tuple(existing)

    def validate(self, value: str) -> ValidationResult:
        problem = snapshot_name_problem(value, self._existing)
        return self.success() if problem is None else self.failure(problem)


class SnapshotNameScreen(ModalScreen[str | None]):
    """Prompts for a new snapshot's name, validating while typing."""

    DEFAULT_CSS = (
        DIALOG_CSS.format(name="SnapshotNameScreen")
        + """
    SnapshotNameScreen #problem { color: $error; height: 1; margin-bottom: 1; }
    """
    )
    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, instance: str, existing: Sequence[str], suggestion: str = "") -> None:
        super().__init__()
        self._instance = instance
        self._existing = tuple(existing)
        self._suggestion = suggestion

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(Text(f"New snapshot of {self._instance}"), classes="dialog--title")
            yield Static(
                "Flushes the disk, then records its current contents under this name.",
                classes="dialog--body",
            )
            yield Input(
                value=self._suggestion,
                placeholder="name (letters, digits, . _ -)",
                validators=[_SnapshotName(self._existing)],
                id="name",
            )
            yield Label("", id="problem")
            with Horizontal(classes="dialog--buttons"):
                yield Button("Cancel", id="cancel")
                yield Button("Create", id="create", variant="primary")

    def on_mount(self) -> None:
        # A blinking cursor re-composites the dimmed screen underneath twice a
        # second; a steady one costs nothing while the prompt waits.
        self.query_one(Input).cursor_blink = False

    def on_input_changed(self, event: Input.Changed) -> None:
        self._show_problem(event.validation_result)

    def _show_problem(self, result: ValidationResult | None) -> None:
        text = "" if result is None or result.is_valid else "; ".join(result.failure_descriptions)
        self.query_one("#problem", Label).update(Text(text))
        self.query_one("#create", Button).disabled = bool(text)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        event.stop()
        self._submit()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        event.stop()
        if event.button.id == "create":
            self._submit()
        else:
            self.dismiss(None)

    def _submit(self) -> None:
        name = self.query_one("#name", Input).value.strip()
        problem = snapshot_name_problem(name, self._existing)
        if problem is not None:
            self.query_one("#problem", Label).update(Text(problem))
            return
        self.dismiss(name)

    def action_cancel(self) -> None:
        self.dismiss(None)
