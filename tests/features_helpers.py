"""Shared by the tests of issue #13's features: a supervisor profile in the configuration, and the calls."""

from __future__ import annotations

import uuid
from typing import Any

from harness import Stream, auth, base_config

from chat.v1 import admin_service_pb2 as admin_pb
from chat.v1 import agent_service_pb2 as agent_pb
from chat.v1 import customer_service_pb2 as cust_pb
from chat.v1 import resources_pb2 as rpb

# agent6 may log in with "supervisors" (supervises sales and support), agent5 with "sales-supervisors" (sales only).
SUPERVISOR = "agent6"
SALES_SUPERVISOR = "agent5"


def with_supervisors(doc: dict[str, Any] | None = None) -> dict[str, Any]:
    doc = doc if doc is not None else base_config()
    doc["profiles"] = [
        *doc["profiles"],
        {"id": "supervisors", "display_name": "Supervisors", "queues": ["sales", "support"], "supervisor": True},
        {"id": "sales-supervisors", "display_name": "Sales supervisors", "queues": ["sales"], "supervisor": True},
    ]
    for agent in doc["agents"]:
        if agent["id"] == SUPERVISOR:
            agent["profiles"] = [*agent["profiles"], "supervisors"]
        elif agent["id"] == SALES_SUPERVISOR:
            agent["profiles"] = [*agent["profiles"], "sales-supervisors"]
    return doc


async def supervisor(server, profile: str = "supervisors"):
    """agent6 (agent5 for "sales-supervisors") logged in with a supervisor profile, not ready (so no chat is
    offered to it)."""
    agent_id = SALES_SUPERVISOR if profile == "sales-supervisors" else SUPERVISOR
    return await server.agent(agent_id, profile, ready=False, offers=False)


def monitor(agent, conversation_id: str, after_seq: int = 0) -> Stream:
    req = agent_pb.MonitorConversationRequest(conversation_id=conversation_id, after_seq=after_seq)
    return Stream(agent.stub.MonitorConversation(req, metadata=agent.md))


async def monitoring(agent, conversation_id: str, after_seq: int = 0) -> Stream:
    """A monitor stream, caught up (its first heartbeat is in)."""
    s = monitor(agent, conversation_id, after_seq)
    await s.wait_for(lambda i: i.HasField("heartbeat"))
    return s


async def whisper(agent, conversation_id: str, text: str, request_id: str = ""):
    req = agent_pb.WhisperRequest(conversation_id=conversation_id, text=text, request_id=request_id or uuid.uuid4().hex)
    return (await agent.stub.Whisper(req, metadata=agent.md)).event


async def barge_in(agent, conversation_id: str):
    req = agent_pb.BargeInRequest(conversation_id=conversation_id)
    return (await agent.stub.BargeIn(req, metadata=agent.md)).conversation


async def live(agent, queue_id: str = ""):
    req = agent_pb.ListLiveConversationsRequest(queue_id=queue_id)
    return list((await agent.stub.ListLiveConversations(req, metadata=agent.md)).live_conversations)


async def agent_reads(agent, conversation_id: str, up_to_seq: int) -> rpb.ReadCursor:
    req = agent_pb.MarkReadRequest(conversation_id=conversation_id, up_to_seq=up_to_seq)
    return (await agent.stub.MarkRead(req, metadata=agent.md)).read_cursor


async def customer_reads(cust, up_to_seq: int) -> rpb.ReadCursor:
    req = cust_pb.CustomerServiceMarkReadRequest(conversation_id=cust.id, up_to_seq=up_to_seq)
    return (await cust.stub.MarkRead(req, metadata=cust.md)).read_cursor


async def rate(cust, score: int, comment: str = "", request_id: str = "") -> rpb.Rating:
    req = cust_pb.RateConversationRequest(
        conversation_id=cust.id, score=score, comment=comment, request_id=request_id or uuid.uuid4().hex
    )
    return (await cust.stub.RateConversation(req, metadata=cust.md)).rating


async def close(agent, conversation_id: str, code: str = "", note: str = "", confirm: bool = True):
    req = agent_pb.CloseConversationRequest(
        conversation_id=conversation_id, confirm=confirm, wrap_up_code_id=code, wrap_up_note=note
    )
    return (await agent.stub.CloseConversation(req, metadata=agent.md)).conversation


async def export(server, conversation_id: str) -> admin_pb.ExportConversationResponse:
    token = await server.admin_token()
    req = admin_pb.ExportConversationRequest(conversation_id=conversation_id)
    return await server.admin_stub.ExportConversation(req, metadata=auth(token))


async def customer_view(cust) -> rpb.Conversation:
    req = cust_pb.CustomerServiceGetConversationRequest(conversation_id=cust.id)
    return (await cust.stub.GetConversation(req, metadata=cust.md)).conversation


async def agent_view(agent, conversation_id: str) -> rpb.Conversation:
    req = agent_pb.GetConversationRequest(conversation_id=conversation_id)
    return (await agent.stub.GetConversation(req, metadata=agent.md)).conversation


def kinds(events) -> list[str]:
    return [e.WhichOneof("kind") for e in events]


def cursors(items) -> list[rpb.ReadCursor]:
    return [i.read_cursor for i in items if i.HasField("read_cursor")]


def is_cursor(pred=lambda c: True):
    return lambda i: i.HasField("read_cursor") and pred(i.read_cursor)


def is_message(text: str):
    return lambda i: i.HasField("event") and i.event.HasField("message") and i.event.message.text == text
