"""The chat.v1 contract: Buf style, browser-friendly call shapes, health and reflection."""

import subprocess
from datetime import UTC, datetime
from pathlib import Path

import grpc
import pytest
from google.protobuf import json_format
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import given, settings
from hypothesis import strategies as st

from chat.v1 import admin_service_pb2, agent_service_pb2, customer_service_pb2, resources_pb2
from queuechat.api import convert
from queuechat.domain.log import ts
from queuechat.domain.views import (
    ConversationView,
    EventView,
    FeedEventView,
    ParticipantView,
    ReadCursorView,
    VariableView,
)

ROOT = Path(__file__).resolve().parent.parent
SERVICES = [
    agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"],
    customer_service_pb2.DESCRIPTOR.services_by_name["CustomerService"],
    admin_service_pb2.DESCRIPTOR.services_by_name["AdminService"],
]


# The contract as last released (docs/deploy.md, "Releasing", has how to refresh it).
RELEASED = ROOT / "proto" / "released" / "chat-v1.binpb"


def _buf(*args: str, cwd: Path = ROOT / "proto") -> subprocess.CompletedProcess[str]:
    buf = ROOT / "node_modules" / ".bin" / "buf"
    if not buf.exists():
        pytest.fail("buf is missing: scripts/setup installs it with npm ci")
    return subprocess.run([str(buf), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_buf_lint_passes():
    result = _buf("lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_no_breaking_change_since_the_released_contract():
    """buf breaking (FILE rules, proto/buf.yaml) against the image of the last release."""
    result = _buf("breaking", "--against", str(RELEASED))
    assert result.returncode == 0, "breaking changes since the released contract:\n" + result.stdout + result.stderr


def test_buf_breaking_catches_a_renumbered_field(tmp_path):
    """The check above would see a break: a scratch copy of proto/ with one field renumbered fails it."""
    import re
    import shutil

    scratch = tmp_path / "proto"
    shutil.copytree(ROOT / "proto", scratch, ignore=shutil.ignore_patterns("released"))
    resources = scratch / "chat" / "v1" / "resources.proto"
    field = re.compile(r"^(\s+[\w.]+ \w+ = )(\d+);", re.MULTILINE)
    renumbered, n = field.subn(lambda m: f"{m[1]}{int(m[2]) + 1000};", resources.read_text(), count=1)
    assert n == 1
    resources.write_text(renumbered)
    result = _buf("breaking", "--against", str(RELEASED), cwd=scratch)
    assert result.returncode != 0
    assert "was deleted" in result.stdout, result.stdout + result.stderr


def test_only_unary_and_server_streaming_calls():
    """Everything must work over grpc-web from a browser."""
    for service in SERVICES:
        for method in service.methods:
            assert not method.client_streaming, f"{service.full_name}/{method.name} streams from the client"


async def test_health_and_reflection_are_served(server):
    health = health_pb2_grpc.HealthStub(server.channel)
    for service in SERVICES + [None]:
        name = service.full_name if service else ""
        resp = await health.Check(health_pb2.HealthCheckRequest(service=name))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING, name

    stub = reflection_pb2_grpc.ServerReflectionStub(server.channel)
    responses = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    names = set()
    async for resp in responses:
        names = {s.name for s in resp.list_services_response.service}
        break
    assert {s.full_name for s in SERVICES} <= names
    assert "grpc.health.v1.Health" in names

    with pytest.raises(grpc.aio.AioRpcError) as err:
        await health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"))
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def _reflective_chat(port: int) -> dict:
    """What grpcurl does: learn the API by reflection, then call it with JSON, no generated code."""
    from google.protobuf import descriptor_pool, json_format, message_factory
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        pool = descriptor_pool.DescriptorPool(ProtoReflectionDescriptorDatabase(channel))

        def call(method: str, body: dict, token: str = "", stream: bool = False):
            service_name, _, name = method.rpartition("/")
            m = pool.FindServiceByName(service_name).FindMethodByName(name)
            req_cls = message_factory.GetMessageClass(m.input_type)
            resp_cls = message_factory.GetMessageClass(m.output_type)
            factory = channel.unary_stream if stream else channel.unary_unary
            rpc = factory(f"/{service_name}/{name}", req_cls.SerializeToString, resp_cls.FromString)
            md = [("authorization", f"Bearer {token}")] if token else None
            result = rpc(json_format.ParseDict(body, req_cls()), metadata=md, timeout=10)
            if stream:
                return result
            return json_format.MessageToDict(result, preserving_proto_field_name=True)

        login = call(
            "chat.v1.AgentService/Login",
            {"username": "agent1", "password": "pw1", "profile_id": "both", "ready": True},
        )
        offers = call("chat.v1.AgentService/StreamOffers", {}, login["session_token"], stream=True)
        started = call("chat.v1.CustomerService/StartChat", {"queue_id": "sales", "variables": {"name": "Ada"}})
        conv_id = started["conversation"]["conversation_id"]
        for item in offers:
            offer = json_format.MessageToDict(item, preserving_proto_field_name=True).get("event", {}).get("offer")
            if offer and offer["conversation_id"] == conv_id:
                break
        offers.cancel()
        call("chat.v1.AgentService/AcceptOffer", {"offer_id": offer["offer_id"]}, login["session_token"])
        call(
            "chat.v1.CustomerService/SendMessage",
            {"conversation_id": conv_id, "text": "Hello!"},
            started["customer_token"],
        )
        return call("chat.v1.CustomerService/GetTranscript", {"conversation_id": conv_id}, started["customer_token"])


async def test_a_reflection_only_client_can_chat(server):
    import asyncio

    transcript = await asyncio.to_thread(_reflective_chat, server.server.port)
    kinds = [next(k for k in e if k not in ("conversation_id", "seq", "create_time", "visibility")) for e in transcript["events"]]
    assert kinds == ["chat_started", "participant_joined", "participant_joined", "message"]
    assert transcript["events"][-1]["message"]["text"] == "Hello!"


_texts = st.text(max_size=40)


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries(
        {"message_id": _texts, "text": _texts, "visibility": st.sampled_from(["VISIBILITY_ALL", "VISIBILITY_AGENTS_ONLY"])},
        optional={
            "predefined_message_id": _texts,
            "whisper": st.booleans(),
            "attachments": st.lists(st.fixed_dictionaries({"attachment_id": _texts, "size_bytes": st.integers(0, 10**9)})),
        },
    ),
    st.fixed_dictionaries(
        {"kind": st.sampled_from(["PARTICIPANT_KIND_AGENT", "PARTICIPANT_KIND_CUSTOMER"]), "display_name": _texts},
        optional={"agent_id": _texts},
    ),
)
def test_a_message_event_converts_as_its_json_says(payload, sender):
    """convert.event sets a plain message's fields itself (ParseDict is slow): the same message either way."""
    payload = {**payload, "sender": sender}
    view = EventView("c1", 7, "message", "all", datetime(2026, 12, 3, tzinfo=UTC), payload)
    expected = resources_pb2.ConversationEvent()
    json_format.ParseDict(payload, expected.message)
    assert convert._event(view).message == expected.message


_times = st.datetimes(min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC)).map(ts)
_odd_times = st.sampled_from(["2026-12-04T10:00:00Z", "2026-12-04T10:00:00.5Z", "2026-12-04T10:00:00.123456789Z"])


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries(
        {
            "offer_id": _texts,
            "conversation_id": _texts,
            "kind": st.sampled_from(["OFFER_KIND_CHAT", "OFFER_KIND_INVITE"]),
        },
        optional={
            "queue": st.fixed_dictionaries({}, optional={"queue_id": _texts, "display_name": _texts}),
            "variables": st.lists(
                st.fixed_dictionaries({"name": _texts, "value": _texts}, optional={"authenticated": st.booleans()}),
                max_size=4,
            ),
            "enqueue_time": _times | _odd_times,
            "create_time": _times,
            "expire_time": _times,
            "waiting_time": st.decimals(-(10**6), 10**9, places=6).map(lambda d: f"{d}s")
            | st.sampled_from(["0s", "1.5s", "-0.25s", "12.123456789s"]),
            "invite": st.fixed_dictionaries({"invite_id": _texts}),
        },
    ),
    st.fixed_dictionaries(
        {
            "offer_id": _texts,
            "state": st.sampled_from(
                ["OFFER_STATE_ACCEPTED", "OFFER_STATE_REJECTED", "OFFER_STATE_TIMED_OUT", "OFFER_STATE_WITHDRAWN"]
            ),
        },
        optional={
            "withdraw_reason": st.sampled_from(["WITHDRAW_REASON_CUSTOMER_LEFT", "WITHDRAW_REASON_TAKEN_ELSEWHERE"])
        },
    ),
)
def test_offer_feed_events_convert_as_their_json_says(offer, update):
    """convert.offer_event sets an offer and an offer update field by field (ParseDict is slow): the same
    message either way, and anything it does not take on (an invite) goes to ParseDict whole."""
    for kind, payload in (("offer", offer), ("offer_update", update)):
        view = FeedEventView("s1", 3, kind, datetime(2026, 12, 4, tzinfo=UTC), payload)
        expected = agent_service_pb2.OfferEvent()
        json_format.ParseDict(payload, getattr(expected, kind))
        assert getattr(convert.offer_event(view), kind) == getattr(expected, kind)
    # The fast path is the one taken, not a fallback every time.
    assert convert._offer_fast(offer, agent_service_pb2.Offer()) == ("invite" not in offer)
    assert convert._offer_update_fast(update, agent_service_pb2.OfferUpdate())


def test_an_offer_the_fast_path_cannot_take_is_parsed_whole_or_refused_as_parse_dict_does():
    bad_enum = {"offer_id": "o", "kind": "OFFER_KIND_NONSENSE", "variables": [{"name": "a", "value": "b"}]}
    with pytest.raises(json_format.ParseError):
        convert.offer_event(FeedEventView("s1", 1, "offer", datetime(2026, 12, 4, tzinfo=UTC), bad_enum))
    for refused in ({"authenticated": 1}, {"waiting_time": "315576000001s"}):  # ParseDict refuses both
        payload = {"offer_id": "o", "variables": [{"name": "a", "value": "b", **refused}]}
        if "waiting_time" in refused:
            payload = {"offer_id": "o", **refused}
        with pytest.raises(json_format.ParseError):
            convert.offer_event(FeedEventView("s1", 1, "offer", datetime(2026, 12, 4, tzinfo=UTC), payload))
    offset = {"offer_id": "o", "create_time": "2026-12-04T12:00:00+02:00", "variables": [{"name": "a", "value": "b"}]}
    got = convert.offer_event(FeedEventView("s1", 1, "offer", datetime(2026, 12, 4, tzinfo=UTC), offset)).offer
    assert got.create_time.ToDatetime() == datetime(2026, 12, 4, 10, 0) and len(got.variables) == 1


@settings(max_examples=500, deadline=None)
@given(st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59, 999999)),
       st.sampled_from([None, UTC]))
def test_a_time_converts_as_timestamp_fromdatetime_converts_it(dt, tz):
    """convert.timestamp computes the seconds and nanos itself (FromDatetime costs twice as much); a naive
    time is UTC, as the store's times are."""
    dt = dt.replace(tzinfo=tz)
    expected = Timestamp()
    expected.FromDatetime(dt.replace(tzinfo=UTC))
    assert convert.timestamp(dt) == expected
    assert convert.timestamp(None) is None


def _conversation_as_before(v):
    """convert.conversation as it was written first, by keyword arguments (the reference)."""
    msg = resources_pb2.Conversation(
        conversation_id=v.id,
        queue=resources_pb2.Queue(queue_id=v.queue_id, display_name=v.queue_name),
        state=convert._STATE[v.status],
        customer_connected=v.customer_connected,
        variables=[resources_pb2.CustomerVariable(name=x.name, value=x.value, authenticated=x.authenticated)
                   for x in v.variables],
        agents=[resources_pb2.Participant(kind=resources_pb2.PARTICIPANT_KIND_AGENT, agent_id=a.agent_id,
                                          display_name=a.display_name) for a in v.agents],
        last_seq=v.last_seq,
        create_time=convert.timestamp(v.created_at),
        close_time=convert.timestamp(v.closed_at),
    )
    msg.read_cursors.extend(convert.read_cursor(c) for c in v.read_cursors)
    if v.ended_at is not None:
        msg.end_time.FromDatetime(v.ended_at.replace(tzinfo=UTC))
    return msg


_epochish = st.sampled_from([datetime(1970, 1, 1, tzinfo=UTC)]) | st.datetimes(
    min_value=datetime(1900, 1, 1), max_value=datetime(2200, 1, 1), timezones=st.just(UTC))
_agent = st.builds(ParticipantView, st.just("agent"), _texts, _texts)


@settings(max_examples=200, deadline=None)
@given(st.builds(
    ConversationView,
    id=_texts, queue_id=_texts, queue_name=_texts,
    status=st.sampled_from(sorted(convert._STATE)), customer_connected=st.booleans(),
    variables=st.lists(st.builds(VariableView, _texts, _texts, st.booleans()), max_size=3).map(tuple),
    agents=st.lists(_agent, max_size=3).map(tuple),
    last_seq=st.integers(0, 2**40), created_at=_epochish, closed_at=st.none() | _epochish,
    read_cursors=st.lists(st.builds(ReadCursorView, _agent, st.integers(0, 99), _epochish), max_size=2).map(tuple),
    ended_at=st.none() | _epochish,
))
def test_a_conversation_converts_as_its_fields_say(view):
    """convert.conversation builds the message in place (keyword arguments copy every sub-message): the same
    message, with the same fields present, as the keyword-argument build."""
    got, expected = convert.conversation(view), _conversation_as_before(view)
    assert got == expected
    assert [f.name for f, _ in got.ListFields()] == [f.name for f, _ in expected.ListFields()]
