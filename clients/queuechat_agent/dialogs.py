"""Modal dialogs of a chat tab: predefined messages, offer menu, invite, attach, download, close warning,
wrap-up."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal, TypeVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.content import Content
from textual.screen import ModalScreen
from textual.suggester import SuggestFromList
from textual.widgets import Button, Input, Label, OptionList, ProgressBar, Static, TextArea
from textual.widgets.option_list import Option

from chat.v1 import resources_pb2 as rpb

from . import text
from .client import Progress, Refused

MAX_FILES = 5

ResultT = TypeVar("ResultT")
InviteChoice = tuple[Literal["agent", "queue", "cancel"], str]


class Dialog(ModalScreen[ResultT | None]):
    """A centred box that returns a ResultT; Escape cancels (dismisses with None)."""

    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]
    DEFAULT_CSS = """
    Dialog { align: center middle; }
    Dialog > Vertical {
        width: 72; max-width: 100%; height: auto; max-height: 100%; overflow-y: auto;
        border: thick $accent; background: $surface; padding: 1 2;
    }
    Dialog .title { text-style: bold; margin-bottom: 1; }
    Dialog .hint { color: $text-muted; margin-top: 1; }
    Dialog .error { color: $error; }
    Dialog .warning { color: $warning; margin-bottom: 1; }
    Dialog Horizontal.buttons { height: auto; margin-top: 1; align-horizontal: right; }
    Dialog Horizontal.buttons Button { margin-left: 1; }
    Dialog OptionList { max-height: 14; }
    Dialog TextArea { height: 8; }
    Dialog Input { margin-bottom: 1; }
    Dialog Input.path { margin-bottom: 0; }
    """

    def error(self, message: str) -> None:
        self.query_one(".error", Static).update(Content(message))


class PredefinedPicker(Dialog[rpb.PredefinedMessage]):
    """The titles of the predefined messages; choosing one returns it."""

    def __init__(self, messages: list[rpb.PredefinedMessage]):
        super().__init__()
        self.messages = messages

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Predefined messages", classes="title")
            yield OptionList(*[Option(Content(m.title), id=m.predefined_message_id) for m in self.messages])
            yield Label("Enter puts the message in the input · Esc cancels", classes="hint")

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.dismiss(self.messages[event.option_index])


class MenuComposer(Dialog[tuple[str, list[str]]]):
    """A prompt and 2 to 10 options, one per line: returns (prompt, labels)."""

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Offer the customer a menu", classes="title")
            yield Input(placeholder="Prompt, e.g. What is it about?", classes="prompt")
            yield Label("Options, one per line (2 to 10):")
            yield TextArea(classes="options")
            yield Static(classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", name="cancel")
                yield Button("Send menu", name="send", variant="primary")

    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        if event.button.name == "cancel":
            self.dismiss(None)
            return
        prompt = self.query_one(".prompt", Input).value.strip()
        labels = [line.strip() for line in self.query_one(".options", TextArea).text.splitlines() if line.strip()]
        if not prompt:
            self.error("Write a prompt.")
        elif not 2 <= len(labels) <= 10:
            self.error(f"Give 2 to 10 options (now {len(labels)}).")
        else:
            self.dismiss((prompt, labels))


class InviteDialog(Dialog[InviteChoice]):
    """Invite a named agent or a random one from a queue: ("agent", id) or ("queue", id).

    While an invite is pending only one is allowed: the dialog offers to cancel it ("cancel", invite_id).
    """

    def __init__(self, pending: rpb.Invite | None, queue_ids: list[str]):
        super().__init__()
        self.pending = pending
        self.queue_ids = queue_ids

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Invite an agent", classes="title")
            if self.pending is not None:
                yield Static(Content(f"The invite to {text.invite_target(self.pending)} is waiting for an answer."))
                with Horizontal(classes="buttons"):
                    yield Button("Keep waiting", name="close")
                    yield Button("Cancel invite", name="cancel-invite", variant="warning")
                return
            yield Label("A named agent:")
            yield Input(placeholder="agent id, e.g. bob", classes="agent")
            yield Label("…or a random available agent from a queue:")
            yield Input(
                placeholder=f"queue id, e.g. {', '.join(self.queue_ids) or 'support'}",
                classes="queue",
                suggester=SuggestFromList(self.queue_ids),
            )
            yield Static(classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", name="close")
                yield Button("Invite", name="invite", variant="primary")

    @on(Input.Submitted)
    def submitted(self) -> None:
        self._invite()

    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        if event.button.name == "close":
            self.dismiss(None)
        elif event.button.name == "cancel-invite":
            # The button is only there while an invite is pending.
            if self.pending is not None:
                self.dismiss(("cancel", self.pending.invite_id))
        else:
            self._invite()

    def _invite(self) -> None:
        agent = self.query_one(".agent", Input).value.strip()
        queue = self.query_one(".queue", Input).value.strip()
        if bool(agent) == bool(queue):
            self.error("Give either an agent or a queue.")
        else:
            self.dismiss(("agent", agent) if agent else ("queue", queue))


class AttachDialog(Dialog[list[rpb.Attachment]]):
    """Up to `room` file paths, uploaded with progress; returns the completed attachments."""

    # Closing returns what did upload even when some failed: unsent uploads count against the five allowed.
    BINDINGS = [Binding("escape", "finish", "Close")]

    def __init__(self, room: int, upload: Callable[[Path, Progress], Awaitable[rpb.Attachment]]):
        super().__init__()
        self.room = room
        self.upload = upload
        self.done: list[rpb.Attachment] = []

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(f"Attach up to {self.room} file(s): text, PDF or images, at most 20 MB each", classes="title")
            for i in range(self.room):
                # One row each (compact): five of them and the buttons fit a terminal of 24 rows.
                yield Input(placeholder=f"path of file {i + 1}", classes="path", compact=True)
                yield ProgressBar(total=100, show_eta=False, classes="progress")
            yield Static(classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", name="cancel", classes="cancel")
                yield Button("Upload", name="upload", classes="upload", variant="primary")

    def on_mount(self) -> None:
        for bar in self.query(ProgressBar):
            bar.display = False

    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        if event.button.name == "upload":
            self.start()
        else:
            self.action_finish()

    def action_finish(self) -> None:
        self.dismiss(self.done)

    @on(Input.Submitted)
    def start(self) -> None:
        jobs = [
            (i, bar, Path(i.value.strip()).expanduser())
            for i, bar in zip(self.query(".path").results(Input), self.query(ProgressBar), strict=True)
            if i.value.strip()
        ]
        if not jobs:
            self.error("Give the path of at least one file.")
            return
        self.query_one("Button.upload", Button).disabled = True
        self._upload_all(jobs)

    @work(exclusive=True)
    async def _upload_all(self, jobs: list[tuple[Input, ProgressBar, Path]]) -> None:
        errors = []
        for field, bar, path in jobs:
            field.disabled = True
            bar.display = True
            try:
                self.done.append(await self.upload(path, _progress_to(bar)))
            except (Refused, OSError) as err:
                errors.append(f"{path.name}: {err}")
        if errors:
            # Keep the dialog up so the agent can read why.
            self.error("\n".join(errors))
            self.query_one("Button.cancel", Button).label = "Done"
        else:
            self.dismiss(self.done)


class DownloadDialog(Dialog[Path]):
    """The files received in the chat; choosing one downloads it with progress and returns its path."""

    def __init__(
        self, files: list[tuple[rpb.Attachment, str]], download: Callable[[rpb.Attachment, Progress], Awaitable[Path]]
    ):
        super().__init__()
        self.files = files
        self.download = download

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Download a received file", classes="title")
            yield OptionList(*[Option(Content(f"{text.attachment(a)} · from {sender}")) for a, sender in self.files])
            yield ProgressBar(total=100, show_eta=False)
            yield Static(classes="error")
            yield Label("Enter downloads the file · Esc cancels", classes="hint")

    def on_mount(self) -> None:
        self.query_one(ProgressBar).display = False

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self._download(self.files[event.option_index][0])

    @work(exclusive=True)
    async def _download(self, attachment: rpb.Attachment) -> None:
        bar = self.query_one(ProgressBar)
        bar.display = True
        try:
            path = await self.download(attachment, _progress_to(bar))
        except (Refused, OSError, ValueError) as err:
            self.error(str(err))
            return
        self.dismiss(path)


class ConfirmClose(ModalScreen[bool]):
    """The customer is still connected: really close the chat?"""

    BINDINGS = [Binding("y", "dismiss(True)", "Close chat"), Binding("n,escape", "dismiss(False)", "Keep open")]
    DEFAULT_CSS = """
    ConfirmClose { align: center middle; }
    ConfirmClose > Vertical {
        width: 60; max-width: 100%; height: auto; border: thick $error; background: $surface; padding: 1 2;
    }
    ConfirmClose .title { text-style: bold; color: $error; margin-bottom: 1; }
    ConfirmClose Horizontal { height: auto; margin-top: 1; align-horizontal: right; }
    ConfirmClose Button { margin-left: 1; }
    """

    def __init__(self, customer: str):
        super().__init__()
        self.customer = customer

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("Close this chat?", classes="title")
            # A Static wraps (a Label would cut the sentence at the box's edge, more so for a long name).
            warning = f"{self.customer} is still connected. Closing ends the chat for them too."
            yield Static(Content(warning), classes="message")
            with Horizontal():
                yield Button("Keep open (n)", name="keep", classes="keep")
                yield Button("Close chat (y)", name="close", variant="error")

    def on_mount(self) -> None:
        self.query_one("Button.keep").focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.name == "close")


WrapUpChoice = tuple[str, str]  # (wrap-up code id or "", note)
NOTE_MAX = 1000


class WrapUpDialog(Dialog[WrapUpChoice]):
    """Close with a wrap-up code and a note: returns (code id, note); the code is "" for none, which only a
    queue that does not require one allows. Warns first when the customer is still connected."""

    def __init__(self, customer: str, codes: list[rpb.WrapUpCode], required: bool, connected: bool):
        super().__init__()
        self.customer = customer
        self.codes = codes
        self.required = required
        self.connected = connected
        # The list's entries: the codes, after "no code" when one may close without.
        self.choices = ([] if required else [("", "(no code)")]) + [(c.wrap_up_code_id, c.display_name) for c in codes]

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label(Content(f"Close the chat with {self.customer}"), classes="title")
            if self.connected:
                warning = f"{self.customer} is still connected. Closing ends the chat for them too."
                yield Static(Content(warning), classes="warning")
            yield Label("Wrap-up code" + (" (required)" if self.required else "") + ":")
            yield OptionList(*[Option(Content(name), id=code or "-") for code, name in self.choices], classes="codes")
            yield Input(placeholder="Note (optional)", max_length=NOTE_MAX, classes="note")
            yield Static(classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Cancel", name="cancel")
                yield Button("Close chat", name="close", classes="close", variant="error")

    def on_mount(self) -> None:
        codes = self.query_one(OptionList)
        codes.highlighted = 0 if self.choices else None
        codes.focus()

    def on_option_list_option_selected(self, event: OptionList.OptionSelected) -> None:
        self.query_one(".note", Input).focus()  # Enter on a code: on to the note

    @on(Input.Submitted)
    def submitted(self) -> None:
        self._close()

    @on(Button.Pressed)
    def pressed(self, event: Button.Pressed) -> None:
        if event.button.name == "cancel":
            self.dismiss(None)
        else:
            self._close()

    def _close(self) -> None:
        index = self.query_one(OptionList).highlighted
        if index is None:
            self.error("Pick a wrap-up code: this queue requires one.")
            return
        self.dismiss((self.choices[index][0], self.query_one(".note", Input).value.strip()))


def _progress_to(bar: ProgressBar) -> Progress:
    """A transfer's progress callback that moves bar."""

    def show(done: int, total: int) -> None:
        bar.update(total=total, progress=done)

    return show
