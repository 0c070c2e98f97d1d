"""Wrap-up: codes configured by the supervisor (file or AdminService, global or per queue), picked by the agent
who closes, with a note; a queue may require one. Both are in the export and filter AdminService's list;
the customer sees neither."""

from __future__ import annotations

import grpc
import pytest
from features_helpers import close, customer_view, export
from harness import auth, expect_error

from chat.v1 import admin_service_pb2 as admin_pb
from chat.v1 import agent_service_pb2 as agent_pb
from chat.v1 import resources_pb2 as rpb

CODES = [
    {"id": "solved", "display_name": "Solved"},
    {"id": "sold", "display_name": "Sold", "queue": "sales"},
    {"id": "escalated", "display_name": "Escalated", "queue": "support"},
]


@pytest.fixture
def config(config):
    config["wrap_up_codes"] = CODES
    config["queues"] = [
        {"id": "sales", "display_name": "Sales"},
        {"id": "support", "display_name": "Support", "wrap_up_required": True},
    ]
    return config


@pytest.fixture
async def admin(server):
    return auth(await server.admin_token())


async def codes_for(agent, conversation_id: str) -> tuple[list[str], bool]:
    req = agent_pb.ListWrapUpCodesRequest(conversation_id=conversation_id)
    resp = await agent.stub.ListWrapUpCodes(req, metadata=agent.md)
    return [c.wrap_up_code_id for c in resp.wrap_up_codes], resp.wrap_up_required


async def listed(server, admin, **filters) -> list[str]:
    req = admin_pb.AdminServiceListConversationsRequest(**filters)
    return [c.conversation_id for c in (await server.admin_stub.ListConversations(req, metadata=admin)).conversations]


async def test_the_agent_closes_with_a_code_and_a_note(server, admin):
    agent, cust = await server.chat(queue="sales")
    assert await codes_for(agent, cust.id) == (["sold", "solved"], False)  # global and the queue's, by name
    closed = await close(agent, cust.id, "sold", "12 seats, annual plan")
    w = closed.wrap_up
    assert (w.wrap_up_code_id, w.display_name, w.note, w.agent.agent_id) == ("sold", "Sold", "12 seats, annual plan", "agent1")
    assert w.create_time.seconds > 0 and closed.end_time.seconds > 0
    exported = (await export(server, cust.id)).conversation
    assert (exported.wrap_up.wrap_up_code_id, exported.wrap_up.note) == ("sold", "12 seats, annual plan")
    # The customer never sees it.
    assert not (await customer_view(cust)).HasField("wrap_up")
    assert not (await cust.transcript()).conversation.HasField("wrap_up")
    assert "seats" not in str(await cust.transcript())


async def test_a_queue_may_require_a_code(server):
    agent, cust = await server.chat(queue="support")
    assert await codes_for(agent, cust.id) == (["escalated", "solved"], True)
    await expect_error(close(agent, cust.id), grpc.StatusCode.FAILED_PRECONDITION, "WRAP_UP_REQUIRED")
    await expect_error(close(agent, cust.id, note="just a note"), grpc.StatusCode.FAILED_PRECONDITION, "WRAP_UP_REQUIRED")
    # Another queue's code, an unknown one, a note too long: refused, nothing changed.
    await expect_error(close(agent, cust.id, "sold"), grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_WRAP_UP_CODE")
    await expect_error(close(agent, cust.id, "nope"), grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_WRAP_UP_CODE")
    await expect_error(
        close(agent, cust.id, "solved", "x" * 1001), grpc.StatusCode.INVALID_ARGUMENT, "WRAP_UP_NOTE_TOO_LONG"
    )
    view = await customer_view(cust)
    assert view.state == rpb.CONVERSATION_STATE_ACTIVE and view.customer_connected
    # Leaving as the last agent after the customer left would close it: the code is needed there too.
    await cust.end()
    await expect_error(agent.leave(cust.id), grpc.StatusCode.FAILED_PRECONDITION, "WRAP_UP_REQUIRED")
    closed = await close(agent, cust.id, "escalated", confirm=False)
    assert closed.state == rpb.CONVERSATION_STATE_CLOSED and closed.wrap_up.wrap_up_code_id == "escalated"


async def test_closing_without_a_code_where_none_is_required(server):
    agent, cust = await server.chat(queue="sales")
    closed = await close(agent, cust.id)
    assert not closed.HasField("wrap_up")


async def test_admin_manages_codes_and_the_requirement(server, admin):
    stub = server.admin_stub
    listed_codes = (await stub.ListWrapUpCodes(admin_pb.AdminServiceListWrapUpCodesRequest(), metadata=admin)).wrap_up_codes
    assert [(c.wrap_up_code_id, c.queue_id) for c in listed_codes] == [("escalated", "support"), ("sold", "sales"), ("solved", "")]
    code = rpb.WrapUpCode(wrap_up_code_id="callback", display_name="Call back", queue_id="sales")
    made = (await stub.CreateWrapUpCode(admin_pb.CreateWrapUpCodeRequest(wrap_up_code=code), metadata=admin)).wrap_up_code
    assert made == code
    await expect_error(
        stub.CreateWrapUpCode(admin_pb.CreateWrapUpCodeRequest(wrap_up_code=code), metadata=admin),
        grpc.StatusCode.ALREADY_EXISTS, "WRAP_UP_CODE_EXISTS",
    )  # fmt: skip
    bad = rpb.WrapUpCode(wrap_up_code_id="x", display_name="X", queue_id="nowhere")
    await expect_error(
        stub.CreateWrapUpCode(admin_pb.CreateWrapUpCodeRequest(wrap_up_code=bad), metadata=admin),
        grpc.StatusCode.INVALID_ARGUMENT, "UNKNOWN_QUEUE",
    )  # fmt: skip
    unnamed = rpb.WrapUpCode(wrap_up_code_id="y", display_name=" ")
    await expect_error(
        stub.CreateWrapUpCode(admin_pb.CreateWrapUpCodeRequest(wrap_up_code=unnamed), metadata=admin),
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    code.display_name, code.queue_id = "Call back later", ""
    updated = (await stub.UpdateWrapUpCode(admin_pb.UpdateWrapUpCodeRequest(wrap_up_code=code), metadata=admin)).wrap_up_code
    assert (updated.display_name, updated.queue_id) == ("Call back later", "")
    await stub.DeleteWrapUpCode(admin_pb.DeleteWrapUpCodeRequest(wrap_up_code_id="callback"), metadata=admin)
    await expect_error(
        stub.DeleteWrapUpCode(admin_pb.DeleteWrapUpCodeRequest(wrap_up_code_id="callback"), metadata=admin),
        grpc.StatusCode.NOT_FOUND, "WRAP_UP_CODE_NOT_FOUND",
    )  # fmt: skip
    # The requirement is a queue's: AdminService sets it, ListQueues shows it.
    q = rpb.Queue(queue_id="sales", display_name="Sales", wrap_up_required=True)
    assert (await stub.UpdateQueue(admin_pb.UpdateQueueRequest(queue=q), metadata=admin)).queue.wrap_up_required
    queues = (await stub.ListQueues(admin_pb.AdminServiceListQueuesRequest(), metadata=admin)).queues
    assert {x.queue_id: x.wrap_up_required for x in queues} == {"sales": True, "support": True}
    agent, cust = await server.chat(queue="sales")
    await expect_error(close(agent, cust.id), grpc.StatusCode.FAILED_PRECONDITION, "WRAP_UP_REQUIRED")
    # Wrap-up codes need an admin.
    await expect_error(
        stub.ListWrapUpCodes(admin_pb.AdminServiceListWrapUpCodesRequest()), grpc.StatusCode.UNAUTHENTICATED
    )


async def test_a_deleted_code_stays_on_the_conversations_closed_with_it(server, admin):
    agent, cust = await server.chat(queue="sales")
    await close(agent, cust.id, "sold")
    await server.admin_stub.DeleteWrapUpCode(admin_pb.DeleteWrapUpCodeRequest(wrap_up_code_id="sold"), metadata=admin)
    exported = (await export(server, cust.id)).conversation
    assert (exported.wrap_up.wrap_up_code_id, exported.wrap_up.display_name) == ("sold", "Sold")
    assert await listed(server, admin, wrap_up_code_id="sold") == [cust.id]


async def test_the_admin_list_filters_by_code_and_queue(server, admin):
    agent = await server.agent("agent1")
    closed: dict[str, str] = {}
    for queue, code in (("sales", "sold"), ("sales", "solved"), ("support", "solved")):
        cust = await server.customer(queue)
        await agent.take(cust.id)
        await close(agent, cust.id, code)
        closed[cust.id] = f"{queue}/{code}"
    open_chat = await server.customer("sales")
    assert set(await listed(server, admin, wrap_up_code_id="solved")) == {
        c for c, what in closed.items() if what.endswith("/solved")
    }
    assert set(await listed(server, admin, queue_id="sales", wrap_up_code_id="solved")) == {
        c for c, what in closed.items() if what == "sales/solved"
    }
    assert set(await listed(server, admin, queue_id="sales")) == {
        *(c for c, what in closed.items() if what.startswith("sales/")),
        open_chat.id,
    }
    assert await listed(server, admin, wrap_up_code_id="sold", page_size=1) == [
        c for c, what in closed.items() if what == "sales/sold"
    ]


def test_the_file_checks_wrap_up_codes_and_the_new_keys():
    from harness import base_config

    from queuechat.config import ConfigError, parse_config

    doc = base_config()
    doc["wrap_up_codes"] = [
        {"id": "a", "display_name": "A", "queue": "nowhere"},
        {"id": "a", "display_name": "Again"},
        {"id": "b", "display_name": "B", "colour": 1},
    ]
    with pytest.raises(ConfigError) as e:
        parse_config(doc)
    problems = "\n".join(e.value.problems)
    assert "wrap_up_codes[2].colour: unknown key; expected one of id, display_name, queue" in problems
    doc["wrap_up_codes"] = doc["wrap_up_codes"][:2]
    with pytest.raises(ConfigError) as e:
        parse_config(doc)
    assert set(e.value.problems) == {
        "wrap_up_codes[0].queue: unknown queue 'nowhere'; expected one of the file's queues: sales, support",
        "wrap_up_codes[1].id: duplicate id 'a' (also wrap_up_codes[0]); expected each id once",
    }
    doc["wrap_up_codes"] = [{"id": "a", "display_name": "A", "queue": "sales"}]
    doc["queues"][0]["wrap_up_required"] = True
    doc["profiles"][0]["supervisor"] = True
    doc["settings"]["rating_window"] = 600.0
    cfg = parse_config(doc)
    assert cfg.wrap_up_codes[0].queue == "sales" and cfg.queues[0].wrap_up_required and cfg.profiles[0].supervisor
    assert cfg.settings.rating_window == 600.0
    doc["settings"]["rating_window"] = 0.0
    with pytest.raises(ConfigError, match="rating_window: expected more than 0"):
        parse_config(doc)
