"""The customer's chat page in headless Chromium (Debian's /usr/bin/chromium), served by the grpc-web bridge,
with an agent on the generated stubs. Screenshots go to test-output/web/."""

import asyncio
import re
import time
import uuid
from pathlib import Path

import jwt
import pytest
from features_helpers import agent_reads, export, is_cursor
from files import ELF, Uploader, png, sha
from harness import IDENTITY_SECRET, is_event
from playwright.async_api import Page, async_playwright, expect
from sqlmodel import func, select

from chat.v1 import agent_service_pb2 as agent_pb
from chat.v1 import resources_pb2 as rpb
from queuechat.store.models import Attachment
from queuechat_web import start_bridge
from queuechat_web.bridge import BUILD_DIR

ROOT = Path(__file__).resolve().parent.parent
SHOTS = ROOT / "test-output" / "web"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]  # fmt: skip

expect.set_options(timeout=10_000)


class Site:
    """The bridge in front of the test server; it can go down and come back on the same port."""

    def __init__(self, server):
        self.server = server
        self.bridge = None

    async def start(self, port: int = 0) -> None:
        self.bridge = await start_bridge(self.server.address, "127.0.0.1", port)

    async def stop(self) -> None:
        await self.bridge.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.bridge.port}/"


@pytest.fixture
async def site(server):
    assert (BUILD_DIR / "app.js").exists(), "the page is not built: run scripts/build-web (scripts/setup does)"
    s = Site(server)
    await s.start()
    try:
        yield s
    finally:
        await s.stop()


@pytest.fixture
async def browser():
    pw = await async_playwright().start()
    b = await pw.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
    try:
        yield b
    finally:
        await b.close()
        await pw.stop()


@pytest.fixture
async def context(browser):
    ctx = await browser.new_context(accept_downloads=True, viewport={"width": 900, "height": 700})
    try:
        yield ctx
    finally:
        await ctx.close()


@pytest.fixture
async def page(context, site):
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    await page.goto(site.url)
    yield page
    assert not errors, f"errors in the page: {errors}"


async def shot(page: Page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    await page.screenshot(path=SHOTS / f"{name}.png")


async def download(page: Page, button) -> bytes:
    async with page.expect_download() as info:
        await button.click()
    d = await info.value
    return await asyncio.to_thread(Path(await d.path()).read_bytes)


def message_box(page: Page):
    return page.get_by_label("Message", exact=True)


async def say(page: Page, text: str) -> None:
    await message_box(page).fill(text)
    await message_box(page).press("Enter")


def texts(page: Page):
    """The conversation's message texts in the page (not the ones still being sent)."""
    return page.locator("#log .msg .text")


async def chat(page: Page, server, agent_id: str = "agent1"):
    """Start a chat in the page; an agent takes it. (agent, conversation id, the agent's stream)."""
    await page.get_by_role("button", name="Start chat").click()
    agent = await server.agent(agent_id)
    conv = await agent.take((await agent.wait_offer()).conversation_id)
    await expect(page.locator("#status")).to_have_text(f"You are chatting with Agent {agent_id[-1]}.")
    return agent, conv.conversation_id, agent.streams[conv.conversation_id]


async def test_a_customer_chats_with_an_agent(server, page):
    # Keyboard only: the queue list has focus, Tab to the name, Enter starts.
    queue = page.get_by_label("What is it about?")
    await expect(queue).to_be_focused()
    await expect(queue.locator("option")).to_have_text(["Sales", "Support"])
    await page.keyboard.press("Tab")
    await page.keyboard.type("Ada")
    await page.keyboard.press("Enter")
    status = page.locator("#status")
    await expect(status).to_have_text("You are number 1 in the queue.")
    await expect(message_box(page)).to_be_focused()
    await shot(page, "waiting-in-queue")

    agent = await server.agent("agent1")
    offer = await agent.wait_offer()
    cid = offer.conversation_id
    assert [(v.name, v.value, v.authenticated) for v in offer.variables] == [("name", "Ada", False)]
    await agent.accept(offer.offer_id)
    stream = agent.open_conversation(cid)
    log = page.get_by_role("log")
    await expect(log).to_contain_text("Agent 1 joined the chat.")
    await expect(status).to_have_text("You are chatting with Agent 1.")

    await say(page, "Hi, my invoice is wrong")
    await stream.wait_for(is_event("message", lambda e: e.message.text == "Hi, my invoice is wrong"))
    await agent.send(cid, "internal note: VIP customer", private=True)
    await agent.send(cid, "Sorry to hear that. Let me look.")
    menu = agent_pb.SendOfferMenuRequest(
        conversation_id=cid,
        request_id="menu-1",
        prompt="Which invoice?",
        options=[
            rpb.OfferMenuOption(option_id="march", label="March"),
            rpb.OfferMenuOption(option_id="april", label="April"),
        ],
    )
    await agent.stub.SendOfferMenu(menu, metadata=agent.md)
    options = page.get_by_role("group", name="Which invoice?")
    await expect(options.get_by_role("button")).to_have_text(["March", "April"])
    await shot(page, "chatting-with-a-menu")
    await options.get_by_role("button", name="April").click()
    chosen = await stream.wait_for(is_event("option_chosen"))
    assert chosen.event.option_chosen.option_id == "april"
    await expect(options.get_by_role("button", name="April")).to_have_attribute("aria-pressed", "true")
    await expect(options.get_by_role("button", name="March")).to_be_disabled()
    await expect(log).to_contain_text("You chose “April”.")

    # A second agent joins through an invite, then leaves.
    other = await server.agent("agent2")
    await agent.invite(cid, agent_id="agent2")
    await other.accept((await other.wait_offer(cid, kind=agent_pb.OFFER_KIND_INVITE)).offer_id)
    await expect(status).to_have_text("You are chatting with Agent 1, Agent 2.")
    await other.leave(cid)
    await expect(log).to_contain_text("Agent 2 left the chat.")
    await expect(status).to_have_text("You are chatting with Agent 1.")

    await agent.send(cid, "Fixed: the April invoice is corrected.")
    await expect(texts(page)).to_have_text(
        [
            "Hi, my invoice is wrong",
            "Sorry to hear that. Let me look.",
            "Which invoice?",
            "Fixed: the April invoice is corrected.",
        ]
    )
    await expect(page.locator("body")).not_to_contain_text("VIP")

    # A phone: nothing wider than the screen.
    await page.set_viewport_size({"width": 375, "height": 667})
    assert await page.evaluate("document.documentElement.scrollWidth") <= 375
    await shot(page, "phone")

    transcript = (await download(page, page.get_by_role("banner").get_by_role("button", name="Transcript"))).decode()
    for line in ("You: Hi, my invoice is wrong", "Agent 1 asked: Which invoice? (March / April)", "You chose “April”.",
                 "Agent 2 left the chat.", "Agent 1: Fixed: the April invoice is corrected."):  # fmt: skip
        assert line in transcript
    assert "VIP" not in transcript

    # The x asks first; Escape keeps the chat going.
    end = page.get_by_role("banner").get_by_role("button", name="End chat")
    dialog = page.get_by_role("dialog", name="End this chat?")
    await end.click()
    await expect(dialog).to_be_visible()
    await page.keyboard.press("Escape")
    await expect(dialog).to_be_hidden()
    await expect(message_box(page)).to_be_focused()
    await end.click()
    await dialog.get_by_role("button", name="End chat").click()
    ended = await stream.wait_for(is_event("chat_ended"))
    assert ended.event.chat_ended.ended_by.kind == rpb.PARTICIPANT_KIND_CUSTOMER
    await expect(page.locator("#ended")).to_contain_text("You ended the chat.")
    await expect(message_box(page)).to_be_hidden()
    keep = page.get_by_role("button", name="Download transcript")
    await expect(keep).to_be_focused()
    await shot(page, "ended")
    transcript = (await download(page, keep)).decode()
    assert "You ended the chat." in transcript and "VIP" not in transcript


async def test_files_go_both_ways_within_the_limits(server, page, tmp_path):
    agent, cid, stream = await chat(page, server)
    picker = page.locator("#file-input")
    files = page.get_by_role("list", name="Files to send")

    async def uploads() -> int:
        def count(s):
            return s.exec(select(func.count()).select_from(Attachment).where(Attachment.conversation_id == cid)).one()

        return await server.core.db.read(count)

    # A real file: the customer sends it, the agent downloads the same bytes.
    photo = png(40, 30)
    await picker.set_input_files(files=[{"name": "photo.png", "mimeType": "image/png", "buffer": photo}])
    await expect(files.get_by_role("listitem")).to_contain_text("Ready")
    await say(page, "Here is a photo")
    got = await stream.wait_for(is_event("message", lambda e: e.message.text == "Here is a photo"))
    (att,) = got.event.message.attachments
    assert (att.file_name, att.content_type, att.sha256) == ("photo.png", "image/png", sha(photo))
    _, data = await Uploader(agent.stub, agent.md, cid, customer=False).download(att.attachment_id)
    assert data == photo
    await expect(files.get_by_role("listitem")).to_have_count(0)

    # Refused in the page, before anything is uploaded: too big, a type the server does not take, a sixth file.
    big = tmp_path / "video.txt"
    with big.open("wb") as f:
        f.truncate(20 * 1024 * 1024 + 1)
    error = page.locator("#composer-error")
    await picker.set_input_files(big)
    await expect(error).to_have_text("“video.txt” is larger than 20 MiB.")
    await picker.set_input_files(files=[{"name": "setup.exe", "mimeType": "application/x-msdownload", "buffer": b"MZ"}])
    await expect(error).to_have_text("“setup.exe” cannot be attached: text, PDF and images only.")
    six = [{"name": f"note{i}.txt", "mimeType": "text/plain", "buffer": f"note {i}\n".encode()} for i in range(6)]
    await picker.set_input_files(files=six)
    await expect(error).to_have_text("You can attach at most 5 files to a message.")
    await expect(files.get_by_role("listitem")).to_have_count(5)
    await expect(files.locator(".ready")).to_have_count(5)
    assert await uploads() == 1 + 5
    await shot(page, "five-files")
    await message_box(page).press("Enter")  # files alone need no text
    got = await stream.wait_for(is_event("message", lambda e: len(e.message.attachments) == 5))
    assert [a.file_name for a in got.event.message.attachments] == [f"note{i}.txt" for i in range(5)]

    # Refused by the server: an executable renamed .txt. Its reason and message reach the page.
    await picker.set_input_files(files=[{"name": "report.txt", "mimeType": "text/plain", "buffer": ELF}])
    refused = files.get_by_role("listitem").filter(has_text="report.txt")
    await expect(refused).to_contain_text("Refused: The content is")
    await expect(refused).to_have_attribute("data-reason", "TYPE_NOT_ALLOWED")
    await refused.get_by_role("button", name="Remove report.txt").click()
    await expect(files.get_by_role("listitem")).to_have_count(0)

    # A file from the agent: the customer downloads it.
    notes = b"Steps to fix it:\n1. Open settings\n"
    sent = await Uploader(agent.stub, agent.md, cid, customer=False).upload(notes, "steps.txt")
    await agent.send(cid, "See the steps", attachment_ids=[sent.attachment_id])
    assert await download(page, page.get_by_role("button", name="Download steps.txt")) == notes


async def test_the_page_resumes_after_a_dropped_connection(server, site, context, page):
    agent, cid, stream = await chat(page, server)
    await say(page, "before the drop")
    await expect(texts(page)).to_have_text(["before the drop"])

    # The browser loses the network; the agent writes meanwhile, and so does the customer.
    await context.set_offline(True)
    connection = page.locator("#connection")
    await expect(connection).to_be_visible()
    for i in (1, 2, 3):
        await agent.send(cid, f"while you were offline {i}")
    await say(page, "typed while offline")
    await expect(page.locator("#outbox")).to_contain_text("Not sent yet, retrying…")
    await context.set_offline(False)
    await stream.wait_for(is_event("message", lambda e: e.message.text == "typed while offline"))
    await expect(connection).to_be_hidden()

    # The bridge goes away (the server end of the connection) and comes back on the same port.
    port = site.bridge.port
    await site.stop()
    await expect(connection).to_be_visible()
    await agent.send(cid, "while the bridge was down")
    await site.start(port)
    await agent.send(cid, "last one")

    everything = ["before the drop", "while you were offline 1", "while you were offline 2", "while you were offline 3",
                  "typed while offline", "while the bridge was down", "last one"]  # fmt: skip
    # Exactly once each, in order: nothing lost, nothing repeated.
    await expect(texts(page)).to_have_text(everything)
    await expect(page.locator("#outbox li")).to_have_count(0)
    await expect(connection).to_be_hidden()
    assert [e.message.text for e in stream.events("message")] == everything

    # A reload resumes the same chat from the tab's session storage.
    await page.reload()
    await expect(texts(page)).to_have_text(everything)
    await say(page, "after the reload")
    await stream.wait_for(is_event("message", lambda e: e.message.text == "after the reload"))


async def test_a_customer_signed_in_by_the_hosting_site(server, site, context):
    claims = {"name": "Ada Lovelace", "email": "ada@example.com", "exp": int(time.time()) + 600}
    token = jwt.encode(claims, IDENTITY_SECRET, algorithm="HS256")
    page = await context.new_page()
    await page.goto(f"{site.url}#identity_token={token}")
    await expect(page.locator("#identity")).to_contain_text("signed in")
    await expect(page.get_by_label("Your name (optional)")).to_be_hidden()
    assert "identity_token" not in page.url  # not left in the address bar or the history
    await page.get_by_label("What is it about?").select_option("support")
    await page.get_by_role("button", name="Start chat").click()
    agent = await server.agent("agent1")
    offer = await agent.wait_offer()
    assert offer.queue.queue_id == "support"
    assert {v.name: (v.value, v.authenticated) for v in offer.variables} == {
        "name": ("Ada Lovelace", True),
        "email": ("ada@example.com", True),
    }

    # A token the server does not accept: its refusal is shown on the start form.
    forged = await context.new_page()
    await forged.goto(f"{site.url}#identity_token=not-a-token-{uuid.uuid4().hex}")
    await forged.get_by_role("button", name="Start chat").click()
    await expect(forged.locator("#start-error")).to_contain_text("The identity token is not valid")

    # A stored chat whose token the server refuses: the stream's refusal (before any message) ends it.
    await forged.evaluate(
        "sessionStorage.setItem('queuechat.session', JSON.stringify({conversationId: 'c1', token: 'qc_forged.x'}))"
    )
    await forged.reload()
    await expect(forged.locator("#start-error")).to_have_text("The customer token is missing or not valid.")
    assert await forged.evaluate("sessionStorage.getItem('queuechat.session')") is None


async def test_times_typing_a_cleared_refusal_and_the_end_in_view(server, page):
    await page.set_viewport_size({"width": 375, "height": 560})
    agent, cid, stream = await chat(page, server)

    # Every message shows when it was sent.
    await say(page, "hello")
    clock = re.compile(r"^\d\d?:\d\d( [AP]M)?$")  # in the browser's locale
    await expect(page.locator("#log .msg").last.locator("time")).to_have_text(clock)
    assert await page.locator("#log .msg time").first.get_attribute("datetime")

    # The agent composes: the page says so until they stop, or until their message comes.
    typing = page.locator("#typing")

    async def agent_types(on: bool = True) -> None:
        await agent.stub.SetTyping(agent_pb.SetTypingRequest(conversation_id=cid, typing=on), metadata=agent.md)

    await agent_types()
    await expect(typing).to_have_text("Agent 1 is typing…")
    await agent_types(False)  # a stop always goes through
    await expect(typing).to_have_text("")
    await asyncio.sleep(2.1)  # the server drops signals closer together than 2 s
    await agent_types()
    await expect(typing).to_have_text("Agent 1 is typing…")
    await agent.send(cid, "Here you go")
    await expect(typing).to_have_text("")

    # The customer composes: the agent's stream gets the indicator; sending says they stopped.
    await message_box(page).press_sequentially("Wait")
    shown = await stream.wait_for(lambda i: i.HasField("typing") and i.typing.typing)
    assert shown.typing.participant.kind == rpb.PARTICIPANT_KIND_CUSTOMER
    await message_box(page).press("Enter")
    await stream.wait_for(lambda i: i.HasField("typing") and not i.typing.typing)

    # A refused file: the reason shows, and goes once the conversation moves on, and for a dialog.
    error = page.locator("#composer-error")
    exe = [{"name": "setup.exe", "mimeType": "application/x-msdownload", "buffer": b"MZ"}]
    await page.locator("#file-input").set_input_files(files=exe)
    await expect(error).to_have_text("“setup.exe” cannot be attached: text, PDF and images only.")
    await agent.send(cid, "Anything else?")
    await expect(error).to_be_hidden()
    await page.locator("#file-input").set_input_files(files=exe)
    await expect(error).to_be_visible()
    await page.get_by_role("banner").get_by_role("button", name="End chat").click()
    await expect(error).to_be_hidden()
    await page.keyboard.press("Escape")

    # Enough lines to scroll, the last with a file: when the chat ends, the end stays in view.
    for i in range(12):
        await agent.send(cid, f"line {i}")
    sent = await Uploader(agent.stub, agent.md, cid, customer=False).upload(b"last\n", "last.txt")
    await agent.send(cid, "The last one", attachment_ids=[sent.attachment_id])
    last = page.get_by_role("button", name="Download last.txt")
    await expect(last).to_be_in_viewport()
    await agent.stub.CloseConversation(
        agent_pb.CloseConversationRequest(conversation_id=cid, confirm=True), metadata=agent.md
    )
    await expect(page.locator("#ended")).to_be_visible()
    await expect(last).to_be_in_viewport(ratio=1)
    await expect(page.locator("#log li").last).to_be_in_viewport(ratio=1)
    await shot(page, "ended-with-a-file")


async def test_read_marks_and_the_rating_after_the_end(server, site, context, page):
    agent, cid, stream = await chat(page, server)
    seqs = {}
    for text in ("first", "second"):
        await say(page, text)
        seqs[text] = (await stream.wait_for(is_event("message", lambda e, t=text: e.message.text == t))).event.seq

    # "Read" under the customer's last message the agent has read, and only there.
    marks = page.locator("#log .msg.mine .read")
    await agent_reads(agent, cid, seqs["first"])
    await expect(page.locator("#log .msg.mine", has_text="first").locator(".read")).to_have_text("Read")
    await agent_reads(agent, cid, seqs["second"])
    await expect(page.locator("#log .msg.mine", has_text="second").locator(".read")).to_have_text("Read")
    await expect(marks).to_have_count(1)

    # The page reads what it shows: the agent sees the customer's cursor reach its message.
    answer = await agent.send(cid, "Thanks, done")
    await stream.wait_for(
        is_cursor(lambda c: c.participant.kind == rpb.PARTICIPANT_KIND_CUSTOMER and c.read_seq >= answer.seq)
    )

    # After the end: the rating, once; the stars say what they are.
    await agent.stub.CloseConversation(
        agent_pb.CloseConversationRequest(conversation_id=cid, confirm=True), metadata=agent.md
    )
    form = page.get_by_role("form", name="How was this chat?")
    await expect(form).to_be_visible()
    send = form.get_by_role("button", name="Send rating")
    await expect(send).to_be_hidden()  # the comment and the button come with a score
    await form.get_by_role("button", name="4 of 5").click()
    await expect(send).to_be_enabled()
    await expect(form.get_by_role("button", name="4 of 5")).to_have_attribute("aria-pressed", "true")
    await form.get_by_label("Anything you would like to add? (optional)").fill("Quick and kind")
    await shot(page, "rating")
    await send.click()
    done = page.locator("#rating-done")
    await expect(done).to_have_text("Thank you for your rating (4 of 5).")
    await expect(form).to_be_hidden()
    rating = (await export(server, cid)).conversation.rating
    assert (rating.score, rating.comment) == (4, "Quick and kind")
    # A reload of the ended chat knows it was rated.
    await page.reload()
    await expect(done).to_have_text("You rated this chat 4 of 5. Thank you!")
    await expect(form).to_be_hidden()

    # A chat nobody answered cannot be rated: no form.
    other = await context.new_page()
    await other.goto(site.url)
    await other.get_by_role("button", name="Start chat").click()
    await expect(other.locator("#status")).to_have_text("You are number 1 in the queue.")
    await other.get_by_role("banner").get_by_role("button", name="End chat").click()
    await other.get_by_role("dialog", name="End this chat?").get_by_role("button", name="End chat").click()
    await expect(other.locator("#ended")).to_contain_text("You ended the chat.")
    await expect(other.get_by_role("form", name="How was this chat?")).to_be_hidden()
