"""Customer ratings: once the chat has ended (by either side), once, 1-5 with an optional comment, within the
rating window. In the conversation views, the export, the admin list's filter and the queue figures."""

from __future__ import annotations

from datetime import timedelta

import grpc
import pytest
from features_helpers import agent_view, close, customer_view, export, rate
from harness import Stream, auth, expect_error

from chat.v1 import admin_service_pb2 as admin_pb
from queuechat.store.models import Conversation


async def test_the_customer_rates_once_after_ending(server):
    agent, cust = await server.chat()
    await expect_error(rate(cust, 5), grpc.StatusCode.FAILED_PRECONDITION, "CHAT_NOT_ENDED")
    await cust.end()
    rating = await rate(cust, 4, "  Quick and friendly  ", request_id="rate-1")
    assert (rating.score, rating.comment) == (4, "Quick and friendly") and rating.create_time.seconds > 0
    # A retry returns it; another rating is refused.
    assert (await rate(cust, 4, "Quick and friendly", request_id="rate-1")) == rating
    await expect_error(rate(cust, 1, "changed my mind"), grpc.StatusCode.FAILED_PRECONDITION, "ALREADY_RATED")
    assert (await customer_view(cust)).rating == rating
    assert (await agent_view(agent, cust.id)).rating == rating
    exported = (await export(server, cust.id)).conversation
    assert (exported.rating.score, exported.rating.comment) == (4, "Quick and friendly")
    assert exported.end_time.seconds > 0


async def test_a_chat_the_agent_closed_can_be_rated(server):
    agent, cust = await server.chat()
    await close(agent, cust.id)
    assert (await rate(cust, 5)).score == 5


async def test_bad_ratings_are_refused_and_change_nothing(server):
    _, cust = await server.chat()
    await cust.end()
    for score in (0, 6, -1):
        await expect_error(rate(cust, score), grpc.StatusCode.INVALID_ARGUMENT, "BAD_SCORE")
    await expect_error(rate(cust, 3, "x" * 1001), grpc.StatusCode.INVALID_ARGUMENT, "COMMENT_TOO_LONG")
    await expect_error(rate(cust, 3, "bad\x00char"), grpc.StatusCode.INVALID_ARGUMENT, "BAD_CHARACTERS")
    assert not (await customer_view(cust)).HasField("rating")
    assert (await rate(cust, 3, "line one\nline two")).comment == "line one\nline two"


async def test_a_chat_nobody_answered_is_not_rated(server):
    cust = await server.customer()
    await cust.end()
    await expect_error(rate(cust, 1), grpc.StatusCode.FAILED_PRECONDITION, "NOT_ANSWERED")


async def test_the_rating_window_closes(server):
    _, cust = await server.chat()
    await cust.end()
    window = server.core.settings.rating_window
    assert window == 3600

    def ended_long_ago(tx):
        conv = tx.session.get(Conversation, cust.id)
        conv.ended_at = tx.now - timedelta(seconds=window + 1)
        tx.session.add(conv)

    await server.core.write(ended_long_ago)
    await expect_error(rate(cust, 5), grpc.StatusCode.FAILED_PRECONDITION, "RATING_WINDOW_CLOSED")


async def test_only_the_customer_of_the_chat_rates_it(server):
    _, cust = await server.chat()
    await cust.end()
    other = await server.customer()
    other.conversation.conversation_id = cust.id  # the other chat's token, this chat's id
    await expect_error(rate(other, 5), grpc.StatusCode.PERMISSION_DENIED)


@pytest.mark.configure(rate_limits={"enabled": True, "ratings_per_conversation": 2})
async def test_rating_is_rate_limited(server):
    _, cust = await server.chat()
    await expect_error(rate(cust, 5), grpc.StatusCode.FAILED_PRECONDITION, "CHAT_NOT_ENDED")
    await expect_error(rate(cust, 5), grpc.StatusCode.FAILED_PRECONDITION, "CHAT_NOT_ENDED")
    await expect_error(rate(cust, 5), grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_RATINGS")


async def test_ratings_in_the_queue_figures_and_the_admin_list(server):
    token = await server.admin_token()
    scores = {}
    agent = await server.agent("agent1")
    for score in (5, 2):
        cust = await server.customer()
        await agent.take(cust.id)
        await cust.end()
        await rate(cust, score)
        scores[cust.id] = score
    stream = Stream(server.admin_stub.StreamQueueStats(admin_pb.StreamQueueStatsRequest(), metadata=auth(token)))
    item = await stream.wait_for(lambda i: i.HasField("snapshot"))
    figures = {q.queue.queue_id: q for q in item.snapshot.queues}
    assert (figures["sales"].ratings_count, figures["sales"].average_rating) == (2, 3.5)
    assert figures["support"].ratings_count == 0 and not figures["support"].HasField("average_rating")
    await stream.cancel()
    req = admin_pb.AdminServiceListConversationsRequest(rating_score=2)
    found = (await server.admin_stub.ListConversations(req, metadata=auth(token))).conversations
    assert [c.conversation_id for c in found] == [c for c, s in scores.items() if s == 2]
    bad = admin_pb.AdminServiceListConversationsRequest(rating_score=9)
    await expect_error(
        server.admin_stub.ListConversations(bad, metadata=auth(token)), grpc.StatusCode.INVALID_ARGUMENT, "BAD_SCORE"
    )


async def test_the_window_is_a_setting(server):
    token = auth(await server.admin_token())
    got = (await server.admin_stub.GetSettings(admin_pb.GetSettingsRequest(), metadata=token)).settings
    assert got.rating_window.seconds == 3600
    got.rating_window.FromSeconds(600)
    saved = (await server.admin_stub.UpdateSettings(admin_pb.UpdateSettingsRequest(settings=got), metadata=token)).settings
    assert saved.rating_window.seconds == 600 and server.core.settings.rating_window == 600
    # Left out of an update, it is kept.
    got.ClearField("rating_window")
    saved = (await server.admin_stub.UpdateSettings(admin_pb.UpdateSettingsRequest(settings=got), metadata=token)).settings
    assert saved.rating_window.seconds == 600
