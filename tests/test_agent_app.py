"""The agent's terminal desktop, driven through Textual's pilot against a real server in the same event loop."""

import asyncio
import re
import unicodedata

import pytest
from agent_helpers import click, customer_sends_file, identity_token, lines, log_in, offer_pane, screen_text, until
from features_helpers import customer_reads, export, is_cursor, with_supervisors
from files import Uploader, pdf
from harness import base_config, is_event
from textual.widgets import Button, DataTable, Input, Label, OptionList, Static, TabPane

from chat.v1 import agent_service_pb2 as agent_pb
from chat.v1 import customer_service_pb2 as cust_pb
from chat.v1 import resources_pb2 as rpb
from queuechat_agent.app import AgentApp, LoginScreen
from queuechat_agent.dialogs import (
    AttachDialog,
    ConfirmClose,
    DownloadDialog,
    InviteDialog,
    MenuComposer,
    PredefinedPicker,
    WrapUpDialog,
)
from queuechat_agent.monitor import MonitorScreen
from queuechat_agent.panes import ChatPane, Entry

SIZE = (120, 36)


def desktop(**kw) -> AgentApp:
    app = AgentApp(**kw)
    app.animation_level = "none"  # the pilot waits out every animation (tab underlines, button presses)
    return app


def plain(widget: Static) -> str:
    return widget.render().plain


def press_button(screen, name: str) -> None:
    next(b for b in screen.query(Button) if b.name == name).press()


def tab_label(app: AgentApp, pane) -> str:
    return app.tabs.get_tab(pane).label_text


def message(text):
    return is_event("message", lambda e: e.message.text == text)


async def show(pilot, pane) -> None:
    """Click the pane's tab, as the agent would."""
    await click(pilot, f"#--content-tab-{pane.id}")
    await until(pilot, lambda: pilot.app.tabs.active == pane.id, f"{pane.id} in front")


async def say(pilot, chat: ChatPane, text: str) -> None:
    """Put text in the chat's input (typing is Textual's business) and press Enter."""
    chat.query_one(".message", Input).value = text
    await pilot.press("enter")


async def dialog(pilot, kind):
    return await until(pilot, lambda: isinstance(pilot.app.screen, kind) and pilot.app.screen, kind.__name__)


async def accept_chat(pilot, server, queue="sales", variables=None, **kw) -> tuple:
    """A customer starts a chat; the agent accepts its offer tab with the a key."""
    app = pilot.app
    cust = await server.customer(queue, variables or {}, **kw)
    cust.open()
    offer = await until(pilot, lambda: offer_pane(app, cust.id), "the offer tab")
    await show(pilot, offer)
    await pilot.press("a")
    chat = await until(pilot, lambda: app.chats.get(cust.id), "the chat tab")
    await until(
        pilot, lambda: app.tabs.active == chat.id and "Agent 1 joined" in lines(chat), "the chat with its history"
    )
    return cust, chat


async def test_offer_accept_messages_predefined_menu_invite_private_files_close(server, tmp_path):
    app = desktop(downloads=tmp_path / "downloads")
    async with app.run_test(size=SIZE) as pilot:
        await log_in(pilot, server.address)
        a2 = await server.agent("agent2")
        token = identity_token(name="Ada Lovelace", email="ada@example.com")
        cust = await server.customer("sales", {"order": "A-1001"}, identity_token=token)
        cust.open()

        # The offer opens as a tab with the queue, the waiting time and the variables; locks on authenticated ones.
        offer = await until(pilot, lambda: offer_pane(app, cust.id), "the offer tab")
        await until(pilot, lambda: app.tabs.active == offer.id, "the offer tab in front")
        assert tab_label(app, offer) == "Offer: Sales"
        assert plain(offer.query_one(".offer-title")) == "New chat in Sales"
        assert plain(offer.query_one(".waiting")).startswith("Waiting 0:0")
        assert plain(offer.query_one(".variables")).splitlines() == [
            "🔒 email: ada@example.com",
            "🔒 name: Ada Lovelace",
            "   order: A-1001",
        ]
        await pilot.press("a")
        chat = await until(pilot, lambda: app.chats.get(cust.id), "the chat tab")
        await until(pilot, lambda: not app.offers and app.tabs.active == chat.id, "the offer tab replaced by the chat")
        assert tab_label(app, chat) == "Ada Lovelace"
        info = plain(chat.query_one(".info-customer"))
        assert "🔒 name: Ada Lovelace" in info and "🔒 email: ada@example.com" in info and "   order: A-1001" in info

        # Messages both ways.
        await cust.send("Hi, my order is late")
        await until(pilot, lambda: "Ada Lovelace: Hi, my order is late" in lines(chat), "the customer's message")
        await pilot.press(*"Let me check", "enter")
        await cust.stream.wait_for(message("Let me check"))
        await until(pilot, lambda: "Agent 1: Let me check" in lines(chat), "our message")
        assert lines(chat).count("Agent 1: Let me check") == 1  # from the stream only, not also from the reply

        # Predefined: the picker lists titles; choosing one fills the input; Enter sends it.
        await pilot.press("f2")
        picker = await dialog(pilot, PredefinedPicker)
        options = picker.query_one(OptionList)
        titles = [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)]
        assert titles == ["Deal", "Hello"]
        options.highlighted = titles.index("Deal")
        await pilot.press("enter")
        field = chat.query_one(".message", Input)
        await until(pilot, lambda: field.value == "Two months free.", "the predefined text in the input")
        await pilot.press("enter")
        got = await cust.stream.wait_for(message("Two months free."))
        assert got.event.message.predefined_message_id == "sales-deal"

        # Offer menu: prompt and options; the customer's choice shows as a structured line.
        await pilot.press("f3")
        composer = await dialog(pilot, MenuComposer)
        composer.query_one(".prompt", Input).value = "What is it about?"
        composer.query_one(".options").text = "Billing\nDelivery\n"
        press_button(composer, "send")
        menu = (await cust.stream.wait_for(is_event("offer_menu"))).event.offer_menu
        assert [o.label for o in menu.options] == ["Billing", "Delivery"]
        await cust.choose(menu.menu_id, menu.options[1].option_id)
        await until(pilot, lambda: "Ada Lovelace: ✓ chose “Delivery” (What is it about?)" in lines(chat), "the choice")

        # Invite a named agent; the outcome shows; we stay.
        await pilot.press("f4")
        invite = await dialog(pilot, InviteDialog)
        invite.query_one(".agent", Input).value = "agent2"
        press_button(invite, "invite")
        await until(pilot, lambda: "Invite to Agent 2: pending" in lines(chat), "the pending invite")
        assert "Agent 2: pending" in plain(chat.query_one(".info-chat"))
        invite_offer = await a2.wait_offer(cust.id, kind=agent_pb.OFFER_KIND_INVITE)
        await a2.accept(invite_offer.offer_id)
        await until(
            pilot, lambda: "Invite to Agent 2: accepted. Stay, or leave the chat (F8)" in lines(chat), "the outcome"
        )
        await until(pilot, lambda: "Agent 2" in plain(chat.query_one(".info-chat")), "agent 2 among the agents")
        s2 = a2.open_conversation(cust.id)

        # Private mode: the eye marker and a colour; agents see it, the customer never does.
        await pilot.press("f5")
        assert plain(chat.query_one(".mode", Label)) == "◉ Private" and field.has_class("private")
        await say(pilot, chat, "VIP customer")
        note = await s2.wait_for(message("VIP customer"))
        assert note.event.visibility == rpb.VISIBILITY_AGENTS_ONLY
        await a2.send(cust.id, "Noted", private=True)
        reply = await until(
            pilot, lambda: next((e for e in chat.query(Entry) if "Noted" in e.line.plain), None), "agent 2's note"
        )
        assert reply.line.plain == "◉ Agent 2: Noted" and reply.has_class("private")
        mine = next(e for e in chat.query(Entry) if "VIP customer" in e.line.plain)
        assert mine.line.plain == "◉ Agent 1: VIP customer" and mine.has_class("private")
        await pilot.press("f5")
        assert plain(chat.query_one(".mode", Label)) == "Message" and not field.has_class("private")
        field.value = "Back to you"
        await click(pilot, f"#{chat.id} Button.send")  # the Send button does what Enter does
        await cust.stream.wait_for(message("Back to you"))
        assert not {"VIP customer", "Noted"} & {e.message.text for e in cust.stream.events("message")}

        # Attach: a file from a path, with progress; it goes on the next message.
        report = tmp_path / "report.pdf"
        report.write_bytes(pdf())
        await pilot.press("f6")
        attach = await dialog(pilot, AttachDialog)
        assert len(attach.query(".path")) == 5
        attach.query(".path").first(Input).value = str(report)
        press_button(attach, "upload")
        await until(pilot, lambda: chat.staged, "the upload")
        assert "⎘ report.pdf" in plain(chat.query_one(".staged"))
        await say(pilot, chat, "Your invoice")
        sent = await cust.stream.wait_for(message("Your invoice"))
        [att] = sent.event.message.attachments
        assert (att.file_name, att.content_type) == ("report.pdf", "application/pdf")
        _, data = await Uploader(cust.stub, cust.md, cust.id, customer=True).download(att.attachment_id)
        assert data == pdf()
        await until(
            pilot,
            lambda: f"Agent 1: Your invoice  ⎘ report.pdf ({len(pdf())} B)" in lines(chat),
            "our file in the log",
        )

        # Download what the customer sent.
        order = b"name;amount\nAda;12\n"
        await customer_sends_file(cust, order, "order.csv", "my order")
        await until(
            pilot, lambda: "⎘ order.csv (19 B)" in plain(chat.query_one(".info-chat")), "the file in the info pane"
        )
        await pilot.press("f7")
        download = await dialog(pilot, DownloadDialog)
        download.query_one(OptionList).highlighted = 0
        await pilot.press("enter")
        saved = tmp_path / "downloads" / "order.csv"
        await until(pilot, lambda: plain(chat.query_one(".notice")) == f"Saved {saved}", "the download")
        assert saved.read_bytes() == order

        # Closing while the customer is connected asks first; keeping it open changes nothing.
        await pilot.press("ctrl+w")
        await dialog(pilot, ConfirmClose)
        await pilot.press("n")
        await until(pilot, lambda: len(app.screen_stack) == 1, "the warning gone")
        assert chat.is_attached
        conv = await a2.stub.GetConversation(agent_pb.GetConversationRequest(conversation_id=cust.id), metadata=a2.md)
        assert conv.conversation.state == rpb.CONVERSATION_STATE_ACTIVE

        # The customer ends: the tab says so, and closes without asking.
        await cust.end()
        await until(pilot, lambda: "Customer ended the chat" in lines(chat), "the end")
        assert plain(chat.query_one(".notice")).startswith("Customer ended the chat")
        assert tab_label(app, chat) == "Ada Lovelace (ended)"
        await pilot.press("ctrl+w")
        await until(pilot, lambda: not chat.is_attached, "the tab closed")
        assert not isinstance(app.screen, ConfirmClose) and cust.id not in app.chats
        await s2.wait_for(is_event("chat_closed"))


async def test_several_chats_unread_markers_and_a_new_offer_does_not_steal_focus(server):
    app = desktop()
    async with app.run_test(size=SIZE) as pilot:
        await log_in(pilot, server.address)
        ada, ada_tab = await accept_chat(pilot, server, variables={"name": "Ada"})
        _, bob_tab = await accept_chat(pilot, server, variables={"name": "Bob"})
        assert app.tabs.active == bob_tab.id and [tab_label(app, t) for t in (ada_tab, bob_tab)] == ["Ada", "Bob"]

        await ada.send("anyone there?")
        await until(pilot, lambda: tab_label(app, ada_tab) == "● Ada (1)", "the unread marker")
        assert tab_label(app, bob_tab) == "Bob"
        await show(pilot, ada_tab)
        assert tab_label(app, ada_tab) == "Ada"
        assert "Ada: anyone there?" in lines(ada_tab) and "Ada: anyone there?" not in lines(bob_tab)

        # A third offer while working a chat: its tab is marked, the agent stays where they are. r rejects it.
        a2 = await server.agent("agent2", "support")
        cleo = await server.customer("support", {"name": "Cleo"})
        offer = await until(pilot, lambda: offer_pane(app, cleo.id), "the third offer")
        assert app.tabs.active == ada_tab.id and tab_label(app, offer) == "● Offer: Support"
        await show(pilot, offer)
        assert tab_label(app, offer) == "Offer: Support"
        await pilot.press("r")
        await until(pilot, lambda: not app.offers and not offer.is_attached, "the rejected offer gone")
        await a2.wait_offer(cleo.id)  # back in the queue, and on to the next agent
        assert len(app.chats) == 2 and "Offer in Support: rejected" in lines(app.home)


async def test_a_key_pressed_as_an_offer_comes_to_the_front_answers_it(server):
    """The tab is switched, and the agent's key comes before the focus has left the chat's input (Textual
    moves it after the next refresh): a answers the offer in front, and nothing lands in the hidden input."""
    app = desktop()
    async with app.run_test(size=SIZE) as pilot:
        await log_in(pilot, server.address)
        _, ada_tab = await accept_chat(pilot, server, variables={"name": "Ada"})
        field = ada_tab.query_one(".message", Input)
        await until(pilot, lambda: app.focused is field, "the chat's input focused")
        bob = await server.customer("sales", {"name": "Bob"})
        offer = await until(pilot, lambda: offer_pane(app, bob.id), "the second offer")
        assert app.tabs.active == ada_tab.id  # behind the chat the agent is in
        app.tabs.active = offer.id  # as a click on its tab does; the focus is still in Ada's input
        await pilot.press("a")
        chat = await until(pilot, lambda: app.chats.get(bob.id), "the accepted chat's tab")
        await until(pilot, lambda: app.tabs.active == chat.id, "the chat in front")
        assert field.value == ""


async def test_a_focus_message_that_comes_after_the_agent_moved_on_does_not_pull_its_tab_back(server):
    """Textual tells a tab that a widget in it took the focus by a message; if the agent has moved to
    another tab by the time it comes (the focus gone from that tab), it must not bring the old tab back."""
    app = desktop()
    async with app.run_test(size=SIZE) as pilot:
        await log_in(pilot, server.address)
        _, ada_tab = await accept_chat(pilot, server, variables={"name": "Ada"})
        await show(pilot, app.home)
        await until(pilot, lambda: app.focused is None, "the focus left in the chat let go")
        ada_tab.post_message(TabPane.Focused(ada_tab))  # as if its input had just taken the focus
        await pilot.pause()
        await pilot.pause()
        assert app.tabs.active == "home"


@pytest.mark.configure(settings={"offer_timeout": 0.5})
async def test_an_unanswered_offer_times_out_and_its_tab_goes(server):
    app = desktop()
    async with app.run_test(size=SIZE) as pilot:
        await log_in(pilot, server.address)
        cust = await server.customer("sales", {"name": "Ada"})
        offer = await until(pilot, lambda: offer_pane(app, cust.id), "the offer tab")
        await until(pilot, lambda: not offer.is_attached, "the offer tab gone")
        await until(pilot, lambda: "Offer in Sales: timed out" in lines(app.home), "the time-out in the activity")


async def test_invites_both_ways_and_leaving_after_an_invite(server):
    app = desktop()
    async with app.run_test(size=SIZE) as pilot:
        await log_in(pilot, server.address)
        # Another agent's invite reaches us like a chat offer, with the customer's details.
        a2 = await server.agent("agent2")
        status = app.query_one("#status")
        await pilot.press("ctrl+r")  # not ready: the customer below goes to agent2
        await until(pilot, lambda: "○ Not ready" in plain(status), "not ready")
        cust = await server.customer("sales", {"name": "Ada"})
        cust.open()
        await a2.take(cust.id)
        await a2.send(cust.id, "note: wants a refund", private=True)
        await pilot.press("ctrl+r")
        await until(pilot, lambda: "● Ready" in plain(status), "ready again")
        await a2.invite(cust.id, agent_id="agent1")
        offer = await until(pilot, lambda: offer_pane(app, cust.id), "the invite offer")
        assert tab_label(app, offer) == "Invite: Sales"
        assert plain(offer.query_one(".offer-title")) == "Agent 2 invites you into a chat in Sales"
        # Who invited, and since when: the customer's time in the queue means nothing here.
        assert re.fullmatch(
            r"Invited by Agent 2 at \d\d:\d\d \(0:0\d ago\) · answer within 0:[0-3]\d",
            plain(offer.query_one(".waiting")),
        )
        await until(pilot, lambda: plain(offer.query_one(".variables")) == "   name: Ada", "the customer's details")
        await pilot.press("a")
        chat = await until(pilot, lambda: app.chats.get(cust.id), "the chat tab")
        # We see the history, the private note included.
        await until(pilot, lambda: "◉ Agent 2: note: wants a refund" in lines(chat), "the history")

        # We invite a random agent from the support queue, who accepts; then we leave, they stay.
        a3 = await server.agent("agent3", "support")
        await show(pilot, chat)
        await pilot.press("f4")
        invite = await dialog(pilot, InviteDialog)
        invite.query_one(".queue", Input).value = "support"
        press_button(invite, "invite")
        offer3 = await a3.wait_offer(cust.id, kind=agent_pb.OFFER_KIND_INVITE)
        await a3.accept(offer3.offer_id)
        await until(
            pilot,
            lambda: "Invite to Agent 3 (from queue support): accepted. Stay, or leave the chat (F8)" in lines(chat),
            "the outcome",
        )
        await pilot.press("f8")
        await until(pilot, lambda: not chat.is_attached, "the tab gone after leaving")
        left = await cust.stream.wait_for(is_event("participant_left"))
        assert left.event.participant_left.participant.agent_id == "agent1"


async def test_last_agent_cannot_leave_and_a_pending_invite_can_be_cancelled(server):
    app = desktop()
    async with app.run_test(size=SIZE) as pilot:
        await log_in(pilot, server.address)
        a2 = await server.agent("agent2")
        cust, chat = await accept_chat(pilot, server, variables={"name": "Ada"})
        await pilot.press("f8")
        await until(pilot, lambda: "last agent" in plain(chat.query_one(".notice")), "the refusal")
        assert chat.is_attached

        await pilot.press("f4")
        invite = await dialog(pilot, InviteDialog)
        invite.query_one(".agent", Input).value = "agent2"
        press_button(invite, "invite")
        offer = await a2.wait_offer(cust.id, kind=agent_pb.OFFER_KIND_INVITE)
        await until(pilot, lambda: chat.pending_invite is not None, "the pending invite")
        await pilot.press("f4")
        pending = await dialog(pilot, InviteDialog)
        press_button(pending, "cancel-invite")
        await until(pilot, lambda: "Invite to Agent 2: cancelled" in lines(chat), "the cancel")
        update = await a2.wait_offer_update(offer.offer_id)
        assert update.withdraw_reason == agent_pb.WITHDRAW_REASON_CANCELLED


@pytest.mark.configure(settings={"stream_grace": 30})
async def test_server_restart_while_the_app_runs_loses_and_repeats_nothing(server):
    app = desktop()
    async with app.run_test(size=SIZE) as pilot:
        await log_in(pilot, server.address)
        cust, chat = await accept_chat(pilot, server, variables={"name": "Ada"})
        await cust.send("before")
        await say(pilot, chat, "answer before")
        await until(pilot, lambda: "Agent 1: answer before" in lines(chat), "the messages before")
        banner = app.query_one("#banner")

        await server.stop()
        await until(pilot, lambda: banner.display, "the reconnecting banner")
        assert "reconnecting" in plain(banner)
        await server.start()
        cust.stub = server.customer_stub
        await cust.send("after 1")  # most likely before the app is back: it comes with the replay
        await cust.send("after 2")
        await until(pilot, lambda: "Ada: after 2" in lines(chat), "the messages after the restart")
        await until(pilot, lambda: not banner.display, "the banner gone")
        await cust.send("live")
        await until(pilot, lambda: "Ada: live" in lines(chat), "a live message")
        said = [line for line in lines(chat) if line.startswith(("Ada:", "Agent 1:"))]
        assert said == ["Ada: before", "Agent 1: answer before", "Ada: after 1", "Ada: after 2", "Ada: live"]

        # The offer feed came back too.
        other = await server.customer("support", {"name": "Bob"})
        await until(pilot, lambda: offer_pane(app, other.id), "an offer after the restart")
        # Sending works again.
        await show(pilot, chat)
        await say(pilot, chat, "still here")
        await until(pilot, lambda: lines(chat).count("Agent 1: still here") == 1, "our message after the restart")


async def test_login_errors_and_an_ended_session_go_back_to_the_login_screen(server):
    app = desktop(server=server.address, username="agent1", password="nope", profile="both")
    async with app.run_test(size=SIZE) as pilot:
        await click(pilot, "#login")
        error = app.screen.query_one(".error")
        await until(pilot, lambda: "BAD_CREDENTIALS" in plain(error), "the refusal")
        await log_in(pilot, server.address)
        cust, chat = await accept_chat(pilot, server, variables={"name": "Ada"})
        await cust.send("still there?")

        await server.agent("agent1")  # the same agent logs in elsewhere
        # The screen is pushed, then composed: wait for its error line, not only for the screen.
        screen = await until(
            pilot,
            lambda: isinstance(app.screen, LoginScreen) and app.screen.query(".error") and app.screen,
            "the login screen",
        )
        await until(pilot, lambda: "session has ended" in plain(screen.query_one(".error")), "the ended-session note")
        assert not app.chats and not chat.is_attached

        # Logging in again brings the agent's open chats back as tabs, with their history.
        await log_in(pilot, server.address)
        again = await until(pilot, lambda: app.chats.get(cust.id), "the chat restored")
        await until(pilot, lambda: "Ada: still there?" in lines(again), "its history")


SMALL = (80, 24)


async def test_the_desktop_fits_80x24_and_anonymous_customers_are_told_apart(server):
    app = desktop()
    async with app.run_test(size=SMALL) as pilot:
        await log_in(pilot, server.address)  # the login box fits: its button is clicked
        cust, chat = await accept_chat(pilot, server, queue="support")
        other, other_tab = await accept_chat(pilot, server, queue="support")
        # Anonymous: the queue and a short number from the conversation id, different for each.
        assert tab_label(app, chat) == f"Customer · support #{cust.id[:4]}"
        assert tab_label(app, other_tab) == f"Customer · support #{other.id[:4]}" != tab_label(app, chat)
        await show(pilot, chat)

        # Lines with the desktop's symbols: a menu, a choice, private notes, a file.
        await say(pilot, chat, "hello")
        await pilot.press("f5")
        await say(pilot, chat, "private note")
        await pilot.press("f3")
        composer = await dialog(pilot, MenuComposer)
        composer.query_one(".prompt", Input).value = "Which?"
        composer.query_one(".options").text = "A\nB\n"
        press_button(composer, "send")
        offered = (await cust.stream.wait_for(is_event("offer_menu"))).event.offer_menu
        await cust.choose(offered.menu_id, offered.options[0].option_id)
        await until(pilot, lambda: "Customer: ✓ chose “A” (Which?)" in lines(chat), "the choice")
        await customer_sends_file(cust, b"a;b\n", "data.csv", "a file")
        await until(pilot, lambda: "Customer: a file  ⎘ data.csv (4 B)" in lines(chat), "the file line")
        await until(pilot, lambda: "◉ Agent 1: private note" in lines(chat), "the private line")

        rows = screen_text(app)
        shown = "\n".join(rows)
        # Every tool, and the footer's keys, on screen.
        for label in ("F2 Predefined", "F3 Menu", "F4 Invite", "F5 Private", "F6 Attach", "F7 Download",
                      "F8 Leave", "^W Close", "^q Quit", "^r Ready"):  # fmt: skip
            assert label in shown, f"{label} is cut off:\n{shown}"
        # The info pane's right border in the last column on every row of the panes.
        bordered = [r for r in rows if "│" in r]
        assert bordered and all(r.rstrip()[-1] in "│╮╯" for r in bordered), shown
        # The symbols are one cell everywhere: not emoji, not East Asian wide or ambiguous.
        from queuechat_agent import text

        for symbol in (text.EYE, text.CLIP, text.MENU, text.CHOSEN):
            assert ord(symbol) < 0x1F000 and unicodedata.east_asian_width(symbol) == "N", symbol

        # The close warning wraps its sentence instead of cutting it, however long the name.
        await pilot.press("ctrl+w")
        await dialog(pilot, ConfirmClose)
        await pilot.pause()
        box = [row.split("█")[1] for row in screen_text(app) if row.count("█") >= 2]  # inside the box's sides
        warning = " ".join(" ".join(box).split())
        assert f"Customer · support #{cust.id[:4]} is still connected. Closing ends the chat for them too." in warning


@pytest.mark.configure(settings={"offer_timeout": 5.0, "reject_cooldown": 1.0})
async def test_an_offer_that_times_out_and_comes_back_keeps_its_place_and_the_keys(server):
    app = desktop()
    async with app.run_test(size=SMALL) as pilot:
        await log_in(pilot, server.address)
        _, chat = await accept_chat(pilot, server, variables={"name": "Ada"}, queue="support")
        field = chat.query_one(".message", Input)
        cust = await server.customer("sales", {"name": "Bob"})
        first = await until(pilot, lambda: offer_pane(app, cust.id), "the offer tab")
        await show(pilot, first)
        place = app._pane_ids().index(first.id)
        # It times out while the agent looks at it: the desktop goes home (and from there to the offer when it
        # comes back, which may be at once), never to the chat and its input.
        await until(pilot, lambda: not first.is_attached, "the offer timed out")
        assert app.tabs.active != chat.id
        # Offered again: in the old place, in front (the agent was looking at it), keys for it work.
        again = await until(pilot, lambda: offer_pane(app, cust.id), "the offer back")
        assert again is not first and app._pane_ids().index(again.id) == place
        await until(pilot, lambda: app.tabs.active == again.id, "the offer in front")
        await pilot.press("r")
        await until(pilot, lambda: not again.is_attached, "the offer answered")
        assert field.value == "" and app.tabs.active != chat.id  # home, or the offer once more


def typing(item) -> bool:
    return item.HasField("typing")


async def test_typing_both_ways_and_private_composing_stays_with_the_agents(server):
    app = desktop()
    async with app.run_test(size=SMALL) as pilot:
        await log_in(pilot, server.address)
        cust, chat = await accept_chat(pilot, server, variables={"name": "Ada"})
        line = chat.query_one(".typing", Static)

        # The customer composes: the tab and the chat say so, until their message comes.
        await cust.stub.SetTyping(
            cust_pb.CustomerServiceSetTypingRequest(conversation_id=cust.id, typing=True), metadata=cust.md
        )
        await until(pilot, lambda: line.display and plain(line) == "Ada is typing…", "the customer typing")
        assert tab_label(app, chat) == "Ada ✎"
        await cust.send("my order")
        await until(pilot, lambda: not line.display and tab_label(app, chat) == "Ada", "typing over with the message")

        # The agent composes: the customer is told; emptying the input says they stopped.
        field = chat.query_one(".message", Input)
        await pilot.press(*"Let me")
        shown = await cust.stream.wait_for(lambda i: typing(i) and i.typing.typing)
        assert shown.typing.participant.agent_id == "agent1"
        field.value = ""
        await cust.stream.wait_for(lambda i: typing(i) and not i.typing.typing)

        # In private mode the signals are agents-only: nothing reaches the customer.
        await pilot.press("f5")
        seen = len(cust.stream.items)
        await asyncio.sleep(1.1)  # past the server's one signal a second
        await pilot.press(*"VIP")
        await until(pilot, lambda: chat.typing_said, "the private signal sent")
        await pilot.press("enter")
        await until(pilot, lambda: "◉ Agent 1: VIP" in lines(chat), "the private note")
        await cust.send("ping")  # the customer's stream has everything sent before its own message
        await cust.stream.wait_for(message("ping"))
        assert not [i for i in cust.stream.items[seen:] if typing(i)]


async def test_unread_counts_from_read_cursors_and_the_customers_read_mark(server):
    app = desktop()
    async with app.run_test(size=SMALL) as pilot:
        await log_in(pilot, server.address)
        ada, ada_tab = await accept_chat(pilot, server, variables={"name": "Ada"})
        # In front, the chat is read as it comes: the customer sees our cursor move.
        await ada.stream.wait_for(is_cursor(lambda c: c.participant.agent_id == "agent1"))
        _, bob_tab = await accept_chat(pilot, server, variables={"name": "Bob"})

        # Behind another tab, the customer's lines are counted; looking at the tab reads them.
        await ada.send("one")
        await ada.send("two")
        await until(pilot, lambda: tab_label(app, ada_tab) == "● Ada (2)", "two unread")
        assert tab_label(app, bob_tab) == "Bob"
        two = next(e.seq for e in ada.stream.events("message") if e.message.text == "two")
        await show(pilot, ada_tab)
        assert tab_label(app, ada_tab) == "Ada"
        await ada.stream.wait_for(is_cursor(lambda c: c.participant.agent_id == "agent1" and c.read_seq >= two))

        # What the customer has read: "✓ Read" after the last of our lines they read, and it moves on.
        await say(pilot, ada_tab, "first answer")
        first = (await ada.stream.wait_for(message("first answer"))).event.seq
        await say(pilot, ada_tab, "second answer")
        second = (await ada.stream.wait_for(message("second answer"))).event.seq

        await customer_reads(ada, first)
        await until(pilot, lambda: marked_in(ada_tab) == ["Agent 1: first answer"], "the read mark")
        await customer_reads(ada, second)
        await until(pilot, lambda: marked_in(ada_tab) == ["Agent 1: second answer"], "the read mark moved")

        # Logging in again: the counts come from the stored cursors.
        await show(pilot, bob_tab)
        await ada.send("three")
        await until(pilot, lambda: tab_label(app, ada_tab) == "● Ada (1)", "one unread")
        await server.agent("agent1")  # the session ends (a login elsewhere)
        await until(pilot, lambda: isinstance(app.screen, LoginScreen) and app.screen.query("#login"), "login")
        await log_in(pilot, server.address)
        again = await until(pilot, lambda: app.chats.get(ada.id), "the chat restored")
        await until(pilot, lambda: "Ada: three" in lines(again), "its history")
        assert app.tabs.active == "home"
        await until(pilot, lambda: tab_label(app, again) == "● Ada (1)", "the count restored")
        assert marked_in(again) == ["Agent 1: second answer"]


def marked_in(chat) -> list[str]:
    return [e.line.plain for e in chat.query(Entry) if e.mark == "✓ Read"]


WRAP_UP_CODES = [
    {"id": "solved", "display_name": "Solved"},
    {"id": "escalated", "display_name": "Escalated", "queue": "support"},
]
QUEUES_SUPPORT_NEEDS_A_CODE = [
    {"id": "sales", "display_name": "Sales"},
    {"id": "support", "display_name": "Support", "wrap_up_required": True},
]


@pytest.mark.configure(wrap_up_codes=WRAP_UP_CODES, queues=QUEUES_SUPPORT_NEEDS_A_CODE)
async def test_closing_picks_a_wrap_up_code_and_a_note(server):
    app = desktop()
    async with app.run_test(size=SMALL) as pilot:
        await log_in(pilot, server.address)
        # A queue that requires a code: no "no code" entry; the warning is part of the same dialog.
        cust, chat = await accept_chat(pilot, server, queue="support", variables={"name": "Ada"})
        await pilot.press("ctrl+w")
        wrap = await dialog(pilot, WrapUpDialog)
        await pilot.pause()
        options = wrap.query_one(OptionList)
        assert [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)] == [
            "Escalated",
            "Solved",
        ]
        assert plain(wrap.query_one(".warning")) == "Ada is still connected. Closing ends the chat for them too."
        await pilot.press("enter")  # the highlighted code (Escalated); on to the note
        await pilot.press(*"tier 2", "enter")
        await until(pilot, lambda: not chat.is_attached, "the chat closed")
        closed = (await export(server, cust.id)).conversation
        assert (closed.wrap_up.wrap_up_code_id, closed.wrap_up.note) == ("escalated", "tier 2")

        # A queue without the rule: "(no code)" comes first; Esc keeps the chat; an ended chat gets no warning.
        cust, chat = await accept_chat(pilot, server, queue="sales", variables={"name": "Bob"})
        await pilot.press("ctrl+w")
        wrap = await dialog(pilot, WrapUpDialog)
        await pilot.pause()
        options = wrap.query_one(OptionList)
        assert [str(options.get_option_at_index(i).prompt) for i in range(options.option_count)] == [
            "(no code)",
            "Solved",
        ]
        await pilot.press("escape")
        await until(pilot, lambda: len(app.screen_stack) == 1, "the dialog gone")
        assert chat.is_attached
        await cust.end()
        await until(pilot, lambda: not chat.customer_connected, "the customer gone")
        await pilot.press("ctrl+w")
        wrap = await dialog(pilot, WrapUpDialog)
        await pilot.pause()
        assert not wrap.query(".warning")
        press_button(wrap, "close")
        await until(pilot, lambda: not chat.is_attached, "the chat closed")
        assert not (await export(server, cust.id)).conversation.HasField("wrap_up")


SUPERVISED = with_supervisors(base_config())


@pytest.mark.configure(profiles=SUPERVISED["profiles"], agents=SUPERVISED["agents"])
async def test_a_supervisor_watches_a_chat_whispers_and_barges_in(server):
    app = desktop(ready=False)  # not offered the chat below
    async with app.run_test(size=SMALL) as pilot:
        await log_in(pilot, server.address, agent_id="agent6", profile="supervisors")
        agent, cust = await server.chat(variables={"name": "Ada"})
        stream = agent.streams[cust.id]
        await cust.send("hello")
        await agent.send(cust.id, "wants a refund", private=True)

        # F9: the live chats of the supervised queues.
        await pilot.press("f9")
        screen = await until(pilot, lambda: isinstance(app.screen, MonitorScreen) and app.screen, "the monitor")
        table = screen.query_one("#live", DataTable)
        await until(pilot, lambda: table.row_count == 1, "the live chat listed")
        cells = [str(c) for c in table.get_row(cust.id)]
        assert cells[:3] == ["Sales", "Ada", "Agent 1"]

        # Enter watches it: everything its agents see, private notes included; the agents are told.
        await pilot.press("enter")
        watch = screen.query_one("#watch")
        await until(pilot, lambda: "◉ Agent 1: wants a refund" in lines(watch), "the private note")
        assert "Ada: hello" in lines(watch)
        await stream.wait_for(is_event("monitor_started"))
        await agent.send(cust.id, "Let me check")
        await until(pilot, lambda: "Agent 1: Let me check" in lines(watch), "a live line")

        # Esc: back to the list, the monitoring stops; Enter watches again.
        await pilot.press("escape")
        await stream.wait_for(is_event("monitor_stopped"))
        await until(pilot, lambda: table.display and table.row_count == 1, "the list again")
        await pilot.press("enter")
        await until(pilot, lambda: "Agent 1: Let me check" in lines(watch), "watching again")
        await stream.wait_for(lambda i: len([e for e in stream.events("monitor_started")]) == 2)

        # A whisper reaches the agents only.
        await pilot.press(*"offer a discount", "enter")
        got = await stream.wait_for(message("offer a discount"))
        assert got.event.message.whisper and got.event.visibility == rpb.VISIBILITY_AGENTS_ONLY
        await until(pilot, lambda: "◉ Agent 6: (whisper)  offer a discount" in lines(watch), "the whisper")

        # F10 barges in: the chat opens as a tab; everyone sees the supervisor join.
        await pilot.press("f10")
        chat = await until(pilot, lambda: app.chats.get(cust.id), "the chat tab")
        await until(pilot, lambda: len(app.screen_stack) == 1 and app.tabs.active == chat.id, "the chat in front")
        joined = await cust.stream.wait_for(is_event("participant_joined", lambda e: e.participant_joined.barge_in))
        assert joined.event.participant_joined.participant.agent_id == "agent6"
        await until(pilot, lambda: "Agent 6 joined (barged in from monitoring)" in lines(chat), "the join")
        assert "◉ Agent 6: (whisper)  offer a discount" in lines(chat)
        await say(pilot, chat, "Hello Ada, I am the supervisor")
        await cust.stream.wait_for(message("Hello Ada, I am the supervisor"))
        assert not [e for e in cust.stream.events("message") if e.message.whisper]
