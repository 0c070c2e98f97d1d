"""The customer page on a cluster: two node processes share the web port (SO_REUSEPORT, as `serve --workers`
does), the page talks to whichever the kernel hands it, and each node is killed (-9) in turn while the chat
goes on. The page reconnects to the same address on its own and resumes from its cursor: nothing lost or
repeated, either way."""

from __future__ import annotations

import asyncio

from cluster import Cluster, Node, cluster_env, free_port, login, nats_url
from harness import base_config
from playwright.async_api import expect
from test_web_page import browser, context, message_box, texts  # noqa: F401  (fixtures and helpers)


class WebNode(Node):
    """A node that also serves the page and the grpc-web bridge, on a port it shares with the others."""

    def __init__(self, cluster: Cluster, name: str, web_port: int):
        super().__init__(cluster, name)
        self.web_port = web_port

    def command(self) -> list[str]:
        cmd = super().command()
        at = cmd.index("--web-listen")
        cmd[at + 1] = f"127.0.0.1:{self.web_port}"
        return cmd


async def test_the_page_keeps_its_chat_through_each_node_being_killed(tmp_path, context):  # noqa: F811
    c = Cluster(tmp_path, base_config(), cluster_env(), nats_url())
    web_port = free_port()
    a, b = WebNode(c, "a", web_port), WebNode(c, "b", web_port)
    c.nodes += [a, b]
    agent = None
    try:
        await asyncio.gather(a.start(), b.start())
        page = await context.new_page()
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        await page.goto(f"http://127.0.0.1:{web_port}/")
        await page.get_by_role("button", name="Start chat").click()

        agent = await login(c.nodes, "agent1")
        offers = agent.follow_offers()
        offered = await offers.wait_event(lambda e: e.WhichOneof("kind") == "offer", "an offer")
        cid = offered.offer.conversation_id
        await agent.accept(offered.offer.offer_id)
        seen = agent.follow(cid)
        await expect(page.locator("#status")).to_have_text("You are chatting with Agent 1.")

        said = []
        for victim in (a, b):
            text = f"before {victim.name} dies"
            await agent.send(cid, text)
            said.append(text)
            await expect(texts(page)).to_have_text(said)
            await victim.kill()
            text = f"after {victim.name} died"
            await agent.send(cid, text)
            said.append(text)
            await expect(texts(page), f"the page resumed after {victim.name} was killed").to_have_text(said)
            typed = f"typed with {victim.name} dead"
            await message_box(page).fill(typed)
            await message_box(page).press("Enter")
            said.append(typed)
            await seen.wait_event(lambda e, t=typed: e.HasField("message") and e.message.text == t, typed)
            await victim.start()  # back on the same ports: the next victim's clients have somewhere to go

        await expect(texts(page)).to_have_text(said)  # exactly once each, in order
        await expect(page.locator("#outbox li")).to_have_count(0)
        assert not errors, f"errors in the page: {errors}"
        got = [e.message.text for e in seen.events if e.HasField("message")]
        assert got == said, "the agent saw every message once, in order"
    finally:
        if agent is not None:
            await agent.stop()
        await c.close()

