"""chat.v1.AdminService: authenticate, validate, translate; the domain does the rest."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator
from typing import Literal, cast, overload

import grpc
from google.protobuf.duration_pb2 import Duration

from chat.v1 import admin_service_pb2 as pb
from chat.v1 import admin_service_pb2_grpc
from chat.v1 import resources_pb2 as rpb

from ..config import Settings
from ..domain.admin import check_id
from ..domain.core import Core
from ..domain.views import (
    AdminPrincipal,
    AgentAccountView,
    Heartbeat,
    PredefinedView,
    ProfileView,
    QueueStatsSnapshot,
    QueueStatsView,
    QueueView,
)
from ..errors import invalid
from . import convert
from .errors import authenticated, bearer, rpc
from .peer import client_address


async def _admin(service: AdminService, request: object, context: grpc.aio.ServicerContext) -> AdminPrincipal:
    return await service.core.authenticate_admin(bearer(context))


admin_call = authenticated(_admin)

MIN_PASSWORD = 8
# Seconds between checks that the admin session of an open StreamQueueStats still exists.
SESSION_RECHECK = 30.0


def _duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def _settings(s: Settings) -> pb.Settings:
    return pb.Settings(
        offer_timeout=_duration(s.offer_timeout),
        reject_cooldown=_duration(s.reject_cooldown),
        stream_grace=_duration(s.stream_grace),
        rating_window=_duration(s.rating_window),
    )


def _queue(q: QueueView) -> rpb.Queue:
    return rpb.Queue(queue_id=q.id, display_name=q.display_name, wrap_up_required=q.wrap_up_required)


def _profile(p: ProfileView) -> rpb.Profile:
    return rpb.Profile(
        profile_id=p.id, display_name=p.display_name, queue_ids=list(p.queue_ids), supervisor=p.supervisor
    )


def _agent(a: AgentAccountView) -> pb.AgentAccount:
    return pb.AgentAccount(
        agent_id=a.id, display_name=a.display_name, max_chats=a.max_chats, profile_ids=list(a.profile_ids)
    )


def _predefined(m: PredefinedView) -> rpb.PredefinedMessage:
    return rpb.PredefinedMessage(
        predefined_message_id=m.id, title=m.title, body=m.body, queue_id=m.queue_id or "", profile_id=m.profile_id or ""
    )


def _queue_stats(q: QueueStatsView) -> pb.QueueStats:
    msg = pb.QueueStats(
        queue=rpb.Queue(queue_id=q.queue_id, display_name=q.queue_name),
        waiting_count=q.waiting_count,
        longest_wait=_duration(q.longest_wait),
        agents_ready=q.agents_ready,
        agents_busy=q.agents_busy,
        agents_not_ready=q.agents_not_ready,
        offers_accepted=q.offers_accepted,
        offers_rejected=q.offers_rejected,
        offers_timed_out=q.offers_timed_out,
        service_level_target=_duration(q.service_level_target),
    )
    if q.service_level is not None:  # unset: no chat answered in the window
        msg.service_level = q.service_level
    msg.ratings_count = q.ratings_count
    if q.average_rating is not None:  # unset: no rating in the window
        msg.average_rating = q.average_rating
    return msg


def _stats_snapshot(v: QueueStatsSnapshot) -> pb.QueueStatsSnapshot:
    return pb.QueueStatsSnapshot(
        queues=[_queue_stats(q) for q in v.queues],
        compute_time=convert.timestamp(v.computed_at),
        window=_duration(v.window),
    )


class AdminService(admin_service_pb2_grpc.AdminServiceServicer):
    def __init__(self, core: Core):
        self.core = core

    @overload
    async def _password_hash(self, password: str, required: Literal[True]) -> str: ...
    @overload
    async def _password_hash(self, password: str, required: bool) -> str | None: ...

    async def _password_hash(self, password: str, required: bool) -> str | None:
        """Hashed here, not in the write: argon2 would hold up the single writer."""
        if not password:
            if required:
                raise invalid("PASSWORD_REQUIRED", "A new agent needs a password.")
            return None
        if len(password) < MIN_PASSWORD:
            raise invalid("PASSWORD_TOO_SHORT", f"The password needs at least {MIN_PASSWORD} characters.")
        return await self.core.hash_password(password)

    @rpc
    async def Login(self, request: pb.AdminServiceLoginRequest, context) -> pb.AdminServiceLoginResponse:
        client = client_address(context, self.core.config.rate_limits.trusted_proxies)
        token = await self.core.admin_login(request.username, request.password, client)
        return pb.AdminServiceLoginResponse(admin_token=token)

    # --- queues --------------------------------------------------------------

    @admin_call
    async def ListQueues(self, request, context, who: AdminPrincipal) -> pb.AdminServiceListQueuesResponse:
        rows = await self.core.list_queues()
        return pb.AdminServiceListQueuesResponse(queues=[_queue(q) for q in rows])

    @admin_call
    async def CreateQueue(self, request: pb.CreateQueueRequest, context, who: AdminPrincipal) -> pb.CreateQueueResponse:
        q = await self.core.create_queue(
            request.queue.queue_id, request.queue.display_name, request.queue.wrap_up_required
        )
        return pb.CreateQueueResponse(queue=_queue(q))

    @admin_call
    async def UpdateQueue(self, request: pb.UpdateQueueRequest, context, who: AdminPrincipal) -> pb.UpdateQueueResponse:
        q = await self.core.update_queue(
            request.queue.queue_id, request.queue.display_name, request.queue.wrap_up_required
        )
        return pb.UpdateQueueResponse(queue=_queue(q))

    @admin_call
    async def DeleteQueue(self, request: pb.DeleteQueueRequest, context, who: AdminPrincipal) -> pb.DeleteQueueResponse:
        await self.core.delete_queue(request.queue_id)
        return pb.DeleteQueueResponse()

    # --- profiles ------------------------------------------------------------

    @admin_call
    async def ListProfiles(self, request, context, who: AdminPrincipal) -> pb.ListProfilesResponse:
        rows = await self.core.list_profiles()
        return pb.ListProfilesResponse(profiles=[_profile(p) for p in rows])

    @admin_call
    async def CreateProfile(
        self, request: pb.CreateProfileRequest, context, who: AdminPrincipal
    ) -> pb.CreateProfileResponse:
        p = request.profile
        row = await self.core.create_profile(p.profile_id, p.display_name, list(p.queue_ids), p.supervisor)
        return pb.CreateProfileResponse(profile=_profile(row))

    @admin_call
    async def UpdateProfile(
        self, request: pb.UpdateProfileRequest, context, who: AdminPrincipal
    ) -> pb.UpdateProfileResponse:
        p = request.profile
        row = await self.core.update_profile(p.profile_id, p.display_name, list(p.queue_ids), p.supervisor)
        return pb.UpdateProfileResponse(profile=_profile(row))

    @admin_call
    async def DeleteProfile(
        self, request: pb.DeleteProfileRequest, context, who: AdminPrincipal
    ) -> pb.DeleteProfileResponse:
        await self.core.delete_profile(request.profile_id)
        return pb.DeleteProfileResponse()

    # --- agents --------------------------------------------------------------

    @admin_call
    async def ListAgents(self, request, context, who: AdminPrincipal) -> pb.ListAgentsResponse:
        rows = await self.core.list_agents()
        return pb.ListAgentsResponse(agents=[_agent(a) for a in rows])

    @admin_call
    async def CreateAgent(self, request: pb.CreateAgentRequest, context, who: AdminPrincipal) -> pb.CreateAgentResponse:
        a = request.agent
        check_id(a.agent_id, "agent_id")  # before paying for the hash
        h = await self._password_hash(a.password, required=True)
        row = await self.core.create_agent(a.agent_id, a.display_name, a.max_chats, list(a.profile_ids), h)
        return pb.CreateAgentResponse(agent=_agent(row))

    @admin_call
    async def UpdateAgent(self, request: pb.UpdateAgentRequest, context, who: AdminPrincipal) -> pb.UpdateAgentResponse:
        a = request.agent
        check_id(a.agent_id, "agent_id")
        h = await self._password_hash(a.password, required=False)
        row = await self.core.update_agent(a.agent_id, a.display_name, a.max_chats, list(a.profile_ids), h)
        return pb.UpdateAgentResponse(agent=_agent(row))

    @admin_call
    async def DeleteAgent(self, request: pb.DeleteAgentRequest, context, who: AdminPrincipal) -> pb.DeleteAgentResponse:
        await self.core.delete_agent(request.agent_id)
        return pb.DeleteAgentResponse()

    # --- predefined messages ----------------------------------------------------

    @admin_call
    async def ListPredefinedMessages(
        self, request, context, who: AdminPrincipal
    ) -> pb.AdminServiceListPredefinedMessagesResponse:
        rows = await self.core.list_all_predefined()
        return pb.AdminServiceListPredefinedMessagesResponse(predefined_messages=[_predefined(m) for m in rows])

    @admin_call
    async def CreatePredefinedMessage(self, request: pb.CreatePredefinedMessageRequest, context, who: AdminPrincipal):
        m = request.predefined_message
        row = await self.core.create_predefined(m.predefined_message_id, m.title, m.body, m.queue_id, m.profile_id
        )
        return pb.CreatePredefinedMessageResponse(predefined_message=_predefined(row))

    @admin_call
    async def UpdatePredefinedMessage(self, request: pb.UpdatePredefinedMessageRequest, context, who: AdminPrincipal):
        m = request.predefined_message
        row = await self.core.update_predefined(m.predefined_message_id, m.title, m.body, m.queue_id, m.profile_id
        )
        return pb.UpdatePredefinedMessageResponse(predefined_message=_predefined(row))

    @admin_call
    async def DeletePredefinedMessage(self, request: pb.DeletePredefinedMessageRequest, context, who: AdminPrincipal):
        await self.core.delete_predefined(request.predefined_message_id)
        return pb.DeletePredefinedMessageResponse()

    # --- wrap-up codes -----------------------------------------------------------

    @admin_call
    async def ListWrapUpCodes(self, request, context, who: AdminPrincipal) -> pb.AdminServiceListWrapUpCodesResponse:
        rows = await self.core.list_wrap_up_codes()
        return pb.AdminServiceListWrapUpCodesResponse(wrap_up_codes=[convert.wrap_up_code(c) for c in rows])

    @admin_call
    async def CreateWrapUpCode(self, request: pb.CreateWrapUpCodeRequest, context, who: AdminPrincipal):
        c = request.wrap_up_code
        row = await self.core.create_wrap_up_code(c.wrap_up_code_id, c.display_name, c.queue_id)
        return pb.CreateWrapUpCodeResponse(wrap_up_code=convert.wrap_up_code(row))

    @admin_call
    async def UpdateWrapUpCode(self, request: pb.UpdateWrapUpCodeRequest, context, who: AdminPrincipal):
        c = request.wrap_up_code
        row = await self.core.update_wrap_up_code(c.wrap_up_code_id, c.display_name, c.queue_id)
        return pb.UpdateWrapUpCodeResponse(wrap_up_code=convert.wrap_up_code(row))

    @admin_call
    async def DeleteWrapUpCode(self, request: pb.DeleteWrapUpCodeRequest, context, who: AdminPrincipal):
        await self.core.delete_wrap_up_code(request.wrap_up_code_id)
        return pb.DeleteWrapUpCodeResponse()

    # --- settings ------------------------------------------------------------

    @admin_call
    async def GetSettings(self, request, context, who: AdminPrincipal) -> pb.GetSettingsResponse:
        return pb.GetSettingsResponse(settings=_settings(self.core.settings))

    @admin_call
    async def UpdateSettings(
        self, request: pb.UpdateSettingsRequest, context, who: AdminPrincipal
    ) -> pb.UpdateSettingsResponse:
        s = request.settings
        new = Settings(
            offer_timeout=s.offer_timeout.ToNanoseconds() / 1e9,
            reject_cooldown=s.reject_cooldown.ToNanoseconds() / 1e9,
            stream_grace=s.stream_grace.ToNanoseconds() / 1e9,
            # Unset: kept (clients from before it existed send three settings).
            rating_window=s.rating_window.ToNanoseconds() / 1e9
            if s.HasField("rating_window")
            else self.core.settings.rating_window,
        )
        saved = await self.core.update_settings(new)
        return pb.UpdateSettingsResponse(settings=_settings(saved))

    # --- conversations -----------------------------------------------------------

    @admin_call
    async def ListConversations(self, request: pb.AdminServiceListConversationsRequest, context, who: AdminPrincipal):
        views, token = await self.core.list_all_conversations(
            request.page_size, request.page_token, request.queue_id, request.wrap_up_code_id, request.rating_score
        )
        return pb.AdminServiceListConversationsResponse(
            conversations=[convert.conversation(v) for v in views], next_page_token=token
        )

    @admin_call
    async def ExportConversation(self, request: pb.ExportConversationRequest, context, who: AdminPrincipal):
        t = await self.core.transcript(who, request.conversation_id)
        return pb.ExportConversationResponse(
            conversation=convert.conversation(t.conversation), events=[convert.event(e) for e in t.events]
        )

    # --- supervisor figures ------------------------------------------------------

    @admin_call
    async def StreamQueueStats(self, request: pb.StreamQueueStatsRequest, context, who: AdminPrincipal):
        """The figures, for as long as the admin session lasts: it is checked again every SESSION_RECHECK
        seconds, which also counts the open stream as use of the session (a wallboard is not idle)."""
        token = bearer(context)
        loop = asyncio.get_running_loop()
        checked = loop.time()
        # Items come at least every heartbeat_interval, so the check runs at least that often.
        figures = cast(AsyncGenerator[object, None], self.core.queue_stats(list(request.queue_ids)))
        async with contextlib.aclosing(figures):
            async for item in figures:
                if loop.time() - checked >= SESSION_RECHECK:
                    await self.core.authenticate_admin(token)  # UNAUTHENTICATED once the session has ended
                    checked = loop.time()
                if isinstance(item, QueueStatsSnapshot):
                    yield pb.StreamQueueStatsResponse(snapshot=_stats_snapshot(item))
                elif isinstance(item, Heartbeat):
                    yield pb.StreamQueueStatsResponse(heartbeat=convert.heartbeat(item))
