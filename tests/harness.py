"""Test harness: a real queuechat server on an ephemeral loopback port, and
agent/customer clients on the generated stubs that collect their streams.

Waiting is always on events with a timeout, never on fixed sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from chat.v1 import admin_service_pb2 as admin_pb
from chat.v1 import admin_service_pb2_grpc, agent_service_pb2_grpc, customer_service_pb2_grpc
from chat.v1 import agent_service_pb2 as agent_pb
from chat.v1 import customer_service_pb2 as cust_pb
from chat.v1 import resources_pb2 as rpb
from queuechat.api.server import ChatServer
from queuechat.config import parse_config
from queuechat.domain.core import Core
from queuechat.store import Database, sqlite_url

WAIT = 10.0
IDENTITY_SECRET = "test-identity-secret-0123456789abcdef"


def base_config(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "settings": {"offer_timeout": 30.0, "reject_cooldown": 30.0, "stream_grace": 0.5},
        "limits": {"heartbeat_interval": 0.5},
        # Off unless a test turns them on (@pytest.mark.configure(rate_limits={"enabled": True, ...})):
        # the suite starts hundreds of chats from one address.
        "rate_limits": {"enabled": False},
        "security": {"identity_secrets": [IDENTITY_SECRET], "argon2_time_cost": 1, "argon2_memory_kib": 1024},
        "queues": [
            {"id": "sales", "display_name": "Sales"},
            {"id": "support", "display_name": "Support"},
        ],
        "profiles": [
            {"id": "both", "display_name": "Both", "queues": ["sales", "support"]},
            {"id": "sales", "display_name": "Sales only", "queues": ["sales"]},
            {"id": "support", "display_name": "Support only", "queues": ["support"]},
        ],
        "agents": [
            {
                "id": f"agent{i}",
                "display_name": f"Agent {i}",
                "password": f"pw{i}",
                "profiles": ["both", "sales", "support"],
            }
            for i in range(1, 7)
        ],
        "admins": [{"id": "admin", "password": "adminpw"}],
        "predefined_messages": [
            {"id": "hello", "title": "Hello", "body": "Hello, how can I help?"},
            {"id": "sales-deal", "title": "Deal", "body": "Two months free.", "queue": "sales"},
            {"id": "support-hours", "title": "Hours", "body": "Open 8-17.", "profile": "support"},
        ],
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    return doc


def error_reason(err: grpc.aio.AioRpcError) -> str:
    """The google.rpc.ErrorInfo reason carried by a failed call."""
    status = rpc_status.from_call(err)
    assert status is not None, f"no rich status on {err.code()}: {err.details()}"
    for detail in status.details:
        info = error_details_pb2.ErrorInfo()
        if detail.Is(info.DESCRIPTOR):
            detail.Unpack(info)
            return info.reason
    raise AssertionError("no ErrorInfo in status details")


async def expect_error(coro, code: grpc.StatusCode, reason: str | None = None) -> grpc.aio.AioRpcError:
    try:
        await coro
    except grpc.aio.AioRpcError as e:
        assert e.code() == code, f"expected {code}, got {e.code()}: {e.details()}"
        if reason is not None:
            assert error_reason(e) == reason, f"expected reason {reason}, got {error_reason(e)}: {e.details()}"
        assert e.details(), "a refusal needs a human message"
        return e
    raise AssertionError(f"expected {code} {reason or ''}, but the call succeeded")


def auth(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


class Stream:
    """Collects a server stream in the background; tests wait for matching items."""

    def __init__(self, call: Any):
        self.call = call
        self.items: list[Any] = []
        self._cond = asyncio.Condition()
        self.error: grpc.aio.AioRpcError | None = None
        self.done = False
        self._task = asyncio.get_running_loop().create_task(self._pump())

    async def _pump(self) -> None:
        try:
            async for item in self.call:
                async with self._cond:
                    self.items.append(item)
                    self._cond.notify_all()
        except grpc.aio.AioRpcError as e:
            self.error = e
        except asyncio.CancelledError:
            pass
        finally:
            self.done = True
            async with self._cond:
                self._cond.notify_all()

    async def wait_for(self, pred: Callable[[Any], bool], timeout: float = WAIT, start: int = 0) -> Any:
        """The first item (from index start) matching pred."""

        def find():
            for item in self.items[start:]:
                if pred(item):
                    return item
            return None

        async def waiter():
            async with self._cond:
                while True:
                    found = find()
                    if found is not None:
                        return found
                    if self.done:
                        raise AssertionError(f"stream ended ({self.error!r}) without a matching item")
                    await self._cond.wait()

        return await asyncio.wait_for(waiter(), timeout)

    async def wait_done(self, timeout: float = WAIT) -> None:
        async def waiter():
            async with self._cond:
                while not self.done:
                    await self._cond.wait()

        await asyncio.wait_for(waiter(), timeout)

    def events(self, kind: str | None = None) -> list[Any]:
        out = [i.event for i in self.items if i.HasField("event")]
        return [e for e in out if kind is None or e.WhichOneof("kind") == kind]

    async def cancel(self) -> None:
        self.call.cancel()
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


def is_event(kind: str, pred: Callable[[Any], bool] = lambda e: True) -> Callable[[Any], bool]:
    return lambda item: item.HasField("event") and item.event.WhichOneof("kind") == kind and pred(item.event)


@dataclass
class AgentClient:
    harness: Harness
    stub: agent_service_pb2_grpc.AgentServiceStub
    token: str
    agent_id: str
    offers: Stream | None = None
    streams: dict[str, Stream] = field(default_factory=dict)

    @property
    def md(self):
        return auth(self.token)

    def open_offers(self, after_seq: int = 0) -> Stream:
        self.offers = Stream(
            self.stub.StreamOffers(agent_pb.StreamOffersRequest(after_seq=after_seq), metadata=self.md)
        )
        return self.offers

    async def wait_offer(self, conversation_id: str | None = None, kind: int | None = None, timeout: float = WAIT):
        assert self.offers is not None
        item = await self.offers.wait_for(
            lambda i: (
                i.HasField("event")
                and i.event.HasField("offer")
                and (conversation_id is None or i.event.offer.conversation_id == conversation_id)
                and (kind is None or i.event.offer.kind == kind)
            ),
            timeout,
        )
        return item.event.offer

    async def wait_offer_update(self, offer_id: str, timeout: float = WAIT):
        assert self.offers is not None
        item = await self.offers.wait_for(
            lambda i: (
                i.HasField("event") and i.event.HasField("offer_update") and i.event.offer_update.offer_id == offer_id
            ),
            timeout,
        )
        return item.event.offer_update

    def offer_ids(self) -> list[str]:
        assert self.offers is not None
        return [i.event.offer.offer_id for i in self.offers.items if i.HasField("event") and i.event.HasField("offer")]

    async def accept(self, offer_id: str):
        return (
            await self.stub.AcceptOffer(agent_pb.AcceptOfferRequest(offer_id=offer_id), metadata=self.md)
        ).conversation

    async def reject(self, offer_id: str):
        await self.stub.RejectOffer(agent_pb.RejectOfferRequest(offer_id=offer_id), metadata=self.md)

    def open_conversation(self, conversation_id: str, after_seq: int = 0) -> Stream:
        s = Stream(
            self.stub.StreamConversation(
                agent_pb.StreamConversationRequest(conversation_id=conversation_id, after_seq=after_seq),
                metadata=self.md,
            )
        )
        self.streams[conversation_id] = s
        return s

    async def send(self, conversation_id: str, text: str = "", *, private: bool = False, request_id: str = "", **kw):
        req = agent_pb.SendMessageRequest(
            conversation_id=conversation_id,
            text=text,
            request_id=request_id or uuid.uuid4().hex,
            visibility=rpb.VISIBILITY_AGENTS_ONLY if private else rpb.VISIBILITY_ALL,
            **kw,
        )
        return (await self.stub.SendMessage(req, metadata=self.md)).event

    async def set_ready(self, ready: bool):
        state = agent_pb.AGENT_STATE_READY if ready else agent_pb.AGENT_STATE_NOT_READY
        await self.stub.SetAgentState(agent_pb.SetAgentStateRequest(state=state), metadata=self.md)

    async def close(self, conversation_id: str, confirm: bool = False):
        return await self.stub.CloseConversation(
            agent_pb.CloseConversationRequest(conversation_id=conversation_id, confirm=confirm), metadata=self.md
        )

    async def leave(self, conversation_id: str):
        await self.stub.LeaveConversation(
            agent_pb.LeaveConversationRequest(conversation_id=conversation_id), metadata=self.md
        )

    async def invite(self, conversation_id: str, *, agent_id: str = "", queue_id: str = "", request_id: str = ""):
        req = agent_pb.InviteAgentRequest(conversation_id=conversation_id, request_id=request_id)
        if agent_id:
            req.agent_id = agent_id
        if queue_id:
            req.queue_id = queue_id
        return (await self.stub.InviteAgent(req, metadata=self.md)).invite

    async def take(self, conversation_id: str):
        """Wait for the chat offer of conversation_id, accept it, open its stream."""
        offer = await self.wait_offer(conversation_id)
        conv = await self.accept(offer.offer_id)
        self.open_conversation(conversation_id)
        return conv

    async def stop(self) -> None:
        for s in list(self.streams.values()) + ([self.offers] if self.offers else []):
            await s.cancel()


@dataclass
class CustomerClient:
    harness: Harness
    stub: customer_service_pb2_grpc.CustomerServiceStub
    token: str
    conversation: rpb.Conversation
    stream: Stream | None = None

    @property
    def id(self) -> str:
        return self.conversation.conversation_id

    @property
    def md(self):
        return auth(self.token)

    def open(self, after_seq: int = 0) -> Stream:
        self.stream = Stream(
            self.stub.StreamConversation(
                cust_pb.CustomerServiceStreamConversationRequest(conversation_id=self.id, after_seq=after_seq),
                metadata=self.md,
            )
        )
        return self.stream

    async def send(self, text: str, request_id: str = ""):
        req = cust_pb.CustomerServiceSendMessageRequest(
            conversation_id=self.id, text=text, request_id=request_id or uuid.uuid4().hex
        )
        return (await self.stub.SendMessage(req, metadata=self.md)).event

    async def choose(self, menu_id: str, option_id: str):
        req = cust_pb.ChooseOptionRequest(conversation_id=self.id, menu_id=menu_id, option_id=option_id)
        return (await self.stub.ChooseOption(req, metadata=self.md)).event

    async def end(self):
        return await self.stub.EndChat(cust_pb.EndChatRequest(conversation_id=self.id), metadata=self.md)

    async def transcript(self):
        return await self.stub.GetTranscript(cust_pb.GetTranscriptRequest(conversation_id=self.id), metadata=self.md)

    async def stop(self) -> None:
        if self.stream:
            await self.stream.cancel()


# agent.load is kept by the writes that change it; this counts it afresh from the rows, in one statement
# (one snapshot, however many nodes write). Every test server is checked when it stops.
LOAD_DRIFT = text("""
SELECT id, load, counted FROM (
  SELECT a.id, a.load,
    (SELECT count(*) FROM participant p JOIN conversation c ON c.id = p.conversation_id
      WHERE p.agent_id = a.id AND p.left_at IS NULL AND c.status = 'active')
    + (SELECT count(*) FROM offer o WHERE o.agent_id = a.id AND o.status = 'pending') AS counted
  FROM agent a
) AS loads WHERE load <> counted
""")


def load_drift(conn) -> list[tuple[str, int, int]]:
    """Agents whose kept load differs from their open conversations plus pending offers: (id, kept, counted)."""
    return [tuple(r) for r in conn.execute(LOAD_DRIFT)]


class Harness:
    def __init__(
        self,
        data_dir: Path,
        config: dict[str, Any],
        database_url: str | None = None,
        *,
        nats_url: str | None = None,
        node_id: str | None = None,
    ):
        """With nats_url, a node of a cluster (its peers: other Harnesses on the same database)."""
        self.nats_url = nats_url
        self.node_id = node_id
        self.data_dir = data_dir
        self.config_doc = config
        self.database_url = database_url or sqlite_url(data_dir)
        self.server: ChatServer | None = None
        self.port = 0  # kept across restarts, so clients can reconnect to the same address
        self.channel: grpc.aio.Channel | None = None
        self._clients: list[Any] = []

    async def start(self) -> Harness:
        core = Core(
            Database(self.database_url),
            parse_config(self.config_doc),
            files_dir=self.data_dir / "files",
            node_id=self.node_id,
            nats_url=self.nats_url,
        )
        self.server = ChatServer(core, f"127.0.0.1:{self.port}")
        await self.server.start()
        self.port = self.server.port
        self.channel = grpc.aio.insecure_channel(self.address)
        self.agent_stub = agent_service_pb2_grpc.AgentServiceStub(self.channel)
        self.customer_stub = customer_service_pb2_grpc.CustomerServiceStub(self.channel)
        self.admin_stub = admin_service_pb2_grpc.AdminServiceStub(self.channel)
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def core(self) -> Core:
        assert self.server is not None
        return self.server.core

    async def stop(self) -> None:
        for c in self._clients:
            await c.stop()
        self._clients.clear()
        if self.channel is not None:
            await self.channel.close()
        if self.server is not None:
            await self.server.stop(grace=0.5)
            engine = create_engine(self.database_url, poolclass=NullPool)
            try:
                with engine.connect() as conn:
                    drift = load_drift(conn)
            finally:
                engine.dispose()
            assert not drift, f"agent.load differs from the rows it counts (id, kept, counted): {drift}"

    async def restart(self) -> None:
        await self.stop()
        await self.start()

    async def agent(self, agent_id: str = "agent1", profile: str = "both", *, ready: bool = True, offers: bool = True):
        n = agent_id.removeprefix("agent")
        resp = await self.agent_stub.Login(
            agent_pb.LoginRequest(username=agent_id, password=f"pw{n}", profile_id=profile, ready=ready)
        )
        client = AgentClient(self, self.agent_stub, resp.session_token, agent_id)
        self._clients.append(client)
        if offers:
            client.open_offers()
            # The stream is live once its first heartbeat or event arrives.
            await client.offers.wait_for(lambda i: True)
        return client

    async def customer(self, queue: str = "sales", variables: dict[str, str] | None = None, **kw) -> CustomerClient:
        resp = await self.customer_stub.StartChat(
            cust_pb.StartChatRequest(queue_id=queue, variables=variables or {}, request_id=uuid.uuid4().hex, **kw)
        )
        client = CustomerClient(self, self.customer_stub, resp.customer_token, resp.conversation)
        self._clients.append(client)
        return client

    async def chat(self, agent_id: str = "agent1", queue: str = "sales", variables: dict[str, str] | None = None):
        """An agent who took a customer's chat; both streams open."""
        agent = await self.agent(agent_id)
        cust = await self.customer(queue, variables)
        cust.open()
        await agent.take(cust.id)
        return agent, cust

    async def admin_token(self) -> str:
        resp = await self.admin_stub.Login(admin_pb.AdminServiceLoginRequest(username="admin", password="adminpw"))
        return resp.admin_token


def configure(doc: dict[str, Any], *, max_chats: dict[str, int] | None = None, **sections: dict[str, Any]) -> None:
    """Apply @pytest.mark.configure(max_chats={"agent1": 1}, settings={"offer_timeout": 0.4}, ...)."""
    for agent in doc["agents"]:
        if max_chats and agent["id"] in max_chats:
            agent["max_chats"] = max_chats[agent["id"]]
    for name, values in sections.items():
        if isinstance(doc.get(name), dict):
            doc[name].update(values)
        else:
            doc[name] = values
