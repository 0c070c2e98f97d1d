"""Issue #13's features on PostgreSQL: read cursors, monitoring with a whisper, wrap-up and a rating,
through the same stubs as on SQLite, and their figures (PostgreSQL's avg() is a numeric)."""

from __future__ import annotations

import pytest
from features_helpers import (
    agent_reads,
    close,
    customer_view,
    export,
    is_cursor,
    is_message,
    kinds,
    monitoring,
    rate,
    supervisor,
    whisper,
    with_supervisors,
)
from harness import Harness, Stream, auth, base_config
from pgutil import pg_url  # noqa: F401  (fixture)

from chat.v1 import admin_service_pb2 as admin_pb


@pytest.fixture
async def pg_server(tmp_path, pg_url):  # noqa: F811
    doc = with_supervisors(base_config())
    doc["wrap_up_codes"] = [{"id": "solved", "display_name": "Solved"}]
    h = await Harness(tmp_path / "data", doc, database_url=pg_url).start()
    try:
        yield h
    finally:
        await h.stop()


async def test_the_features_on_postgresql(pg_server):
    server = pg_server
    agent, cust = await server.chat()
    sent = await cust.send("hello")
    private = await agent.send(cust.id, "note", private=True)
    assert (await agent_reads(agent, cust.id, private.seq)).read_seq == private.seq
    await cust.stream.wait_for(is_cursor(lambda c: c.read_seq == sent.seq))
    assert [c.read_seq for c in (await customer_view(cust)).read_cursors] == [sent.seq]

    sup = await supervisor(server)
    watch = await monitoring(sup, cust.id)
    await whisper(sup, cust.id, "psst")
    await agent.streams[cust.id].wait_for(is_message("psst"))
    await watch.cancel()

    closed = await close(agent, cust.id, "solved", "done")
    assert closed.wrap_up.wrap_up_code_id == "solved"
    assert (await rate(cust, 4)).score == 4
    log = await export(server, cust.id)
    assert {"monitor_started", "monitor_stopped"} <= set(kinds(log.events))
    assert (log.conversation.rating.score, log.conversation.wrap_up.note) == (4, "done")

    token = auth(await server.admin_token())
    stream = Stream(server.admin_stub.StreamQueueStats(admin_pb.StreamQueueStatsRequest(), metadata=token))
    item = await stream.wait_for(lambda i: i.HasField("snapshot"))
    sales = next(q for q in item.snapshot.queues if q.queue.queue_id == "sales")
    assert (sales.ratings_count, sales.average_rating) == (1, 4.0)
    await stream.cancel()
    found = await server.admin_stub.ListConversations(
        admin_pb.AdminServiceListConversationsRequest(wrap_up_code_id="solved", rating_score=4), metadata=token
    )
    assert [c.conversation_id for c in found.conversations] == [cust.id]
