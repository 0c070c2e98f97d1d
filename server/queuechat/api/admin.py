"""chat.v1.AdminService: authenticate, validate, translate; the domain does the rest."""

from __future__ import annotations

import asyncio

from google.protobuf.duration_pb2 import Duration

from chat.v1 import admin_service_pb2 as pb
from chat.v1 import admin_service_pb2_grpc
from chat.v1 import resources_pb2 as rpb

from ..config import Settings
from ..domain import admin
from ..domain.core import Core
from ..errors import invalid
from . import convert
from .errors import bearer, rpc

MIN_PASSWORD = 8


def _duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def _settings(s: Settings) -> pb.Settings:
    return pb.Settings(
        offer_timeout=_duration(s.offer_timeout),
        reject_cooldown=_duration(s.reject_cooldown),
        stream_grace=_duration(s.stream_grace),
    )


def _queue(q) -> rpb.Queue:
    return rpb.Queue(queue_id=q.id, display_name=q.display_name)


def _profile(p: admin.ProfileRow) -> rpb.Profile:
    return rpb.Profile(profile_id=p.id, display_name=p.display_name, queue_ids=list(p.queue_ids))


def _agent(a: admin.AgentRow) -> pb.AgentAccount:
    return pb.AgentAccount(
        agent_id=a.id, display_name=a.display_name, max_chats=a.max_chats, profile_ids=list(a.profile_ids)
    )


def _predefined(m) -> rpb.PredefinedMessage:
    return rpb.PredefinedMessage(
        predefined_message_id=m.id, title=m.title, body=m.body, queue_id=m.queue_id or "", profile_id=m.profile_id or ""
    )


class AdminService(admin_service_pb2_grpc.AdminServiceServicer):
    def __init__(self, core: Core):
        self.core = core

    async def _who(self, context):
        return await self.core.authenticate_admin(bearer(context))

    async def _write(self, fn, *args):
        return await self.core.db.write(fn, self.core, *args)

    async def _password_hash(self, password: str, required: bool) -> str | None:
        """Hashed here, not in the write: argon2 would hold up the single writer."""
        if not password:
            if required:
                raise invalid("PASSWORD_REQUIRED", "A new agent needs a password.")
            return None
        if len(password) < MIN_PASSWORD:
            raise invalid("PASSWORD_TOO_SHORT", f"The password needs at least {MIN_PASSWORD} characters.")
        return await asyncio.get_running_loop().run_in_executor(None, self.core.passwords.hash, password)

    @rpc
    async def Login(self, request: pb.AdminServiceLoginRequest, context) -> pb.AdminServiceLoginResponse:
        token = await self.core.admin_login(request.username, request.password)
        return pb.AdminServiceLoginResponse(admin_token=token)

    # --- queues --------------------------------------------------------------

    @rpc
    async def ListQueues(self, request, context) -> pb.AdminServiceListQueuesResponse:
        await self._who(context)
        rows = await self.core.db.read(admin.list_queues)
        return pb.AdminServiceListQueuesResponse(queues=[_queue(q) for q in rows])

    @rpc
    async def CreateQueue(self, request: pb.CreateQueueRequest, context) -> pb.CreateQueueResponse:
        await self._who(context)
        q = await self._write(admin.create_queue, request.queue.queue_id, request.queue.display_name)
        return pb.CreateQueueResponse(queue=_queue(q))

    @rpc
    async def UpdateQueue(self, request: pb.UpdateQueueRequest, context) -> pb.UpdateQueueResponse:
        await self._who(context)
        q = await self._write(admin.update_queue, request.queue.queue_id, request.queue.display_name)
        return pb.UpdateQueueResponse(queue=_queue(q))

    @rpc
    async def DeleteQueue(self, request: pb.DeleteQueueRequest, context) -> pb.DeleteQueueResponse:
        await self._who(context)
        await self._write(admin.delete_queue, request.queue_id)
        return pb.DeleteQueueResponse()

    # --- profiles ------------------------------------------------------------

    @rpc
    async def ListProfiles(self, request, context) -> pb.ListProfilesResponse:
        await self._who(context)
        rows = await self.core.db.read(admin.list_profiles)
        return pb.ListProfilesResponse(profiles=[_profile(p) for p in rows])

    @rpc
    async def CreateProfile(self, request: pb.CreateProfileRequest, context) -> pb.CreateProfileResponse:
        await self._who(context)
        p = request.profile
        row = await self._write(admin.create_profile, p.profile_id, p.display_name, list(p.queue_ids))
        return pb.CreateProfileResponse(profile=_profile(row))

    @rpc
    async def UpdateProfile(self, request: pb.UpdateProfileRequest, context) -> pb.UpdateProfileResponse:
        await self._who(context)
        p = request.profile
        row = await self._write(admin.update_profile, p.profile_id, p.display_name, list(p.queue_ids))
        return pb.UpdateProfileResponse(profile=_profile(row))

    @rpc
    async def DeleteProfile(self, request: pb.DeleteProfileRequest, context) -> pb.DeleteProfileResponse:
        await self._who(context)
        await self._write(admin.delete_profile, request.profile_id)
        return pb.DeleteProfileResponse()

    # --- agents --------------------------------------------------------------

    @rpc
    async def ListAgents(self, request, context) -> pb.ListAgentsResponse:
        await self._who(context)
        rows = await self.core.db.read(admin.list_agents)
        return pb.ListAgentsResponse(agents=[_agent(a) for a in rows])

    @rpc
    async def CreateAgent(self, request: pb.CreateAgentRequest, context) -> pb.CreateAgentResponse:
        await self._who(context)
        a = request.agent
        admin.check_id(a.agent_id, "agent_id")  # before paying for the hash
        h = await self._password_hash(a.password, required=True)
        row = await self._write(admin.create_agent, a.agent_id, a.display_name, a.max_chats, list(a.profile_ids), h)
        return pb.CreateAgentResponse(agent=_agent(row))

    @rpc
    async def UpdateAgent(self, request: pb.UpdateAgentRequest, context) -> pb.UpdateAgentResponse:
        await self._who(context)
        a = request.agent
        admin.check_id(a.agent_id, "agent_id")
        h = await self._password_hash(a.password, required=False)
        row = await self._write(admin.update_agent, a.agent_id, a.display_name, a.max_chats, list(a.profile_ids), h)
        return pb.UpdateAgentResponse(agent=_agent(row))

    @rpc
    async def DeleteAgent(self, request: pb.DeleteAgentRequest, context) -> pb.DeleteAgentResponse:
        await self._who(context)
        await self._write(admin.delete_agent, request.agent_id)
        return pb.DeleteAgentResponse()

    # --- predefined messages ----------------------------------------------------

    @rpc
    async def ListPredefinedMessages(self, request, context) -> pb.AdminServiceListPredefinedMessagesResponse:
        await self._who(context)
        rows = await self.core.db.read(admin.list_predefined)
        return pb.AdminServiceListPredefinedMessagesResponse(predefined_messages=[_predefined(m) for m in rows])

    @rpc
    async def CreatePredefinedMessage(self, request: pb.CreatePredefinedMessageRequest, context):
        await self._who(context)
        m = request.predefined_message
        row = await self._write(
            admin.create_predefined, m.predefined_message_id, m.title, m.body, m.queue_id, m.profile_id
        )
        return pb.CreatePredefinedMessageResponse(predefined_message=_predefined(row))

    @rpc
    async def UpdatePredefinedMessage(self, request: pb.UpdatePredefinedMessageRequest, context):
        await self._who(context)
        m = request.predefined_message
        row = await self._write(
            admin.update_predefined, m.predefined_message_id, m.title, m.body, m.queue_id, m.profile_id
        )
        return pb.UpdatePredefinedMessageResponse(predefined_message=_predefined(row))

    @rpc
    async def DeletePredefinedMessage(self, request: pb.DeletePredefinedMessageRequest, context):
        await self._who(context)
        await self._write(admin.delete_predefined, request.predefined_message_id)
        return pb.DeletePredefinedMessageResponse()

    # --- settings ------------------------------------------------------------

    @rpc
    async def GetSettings(self, request, context) -> pb.GetSettingsResponse:
        await self._who(context)
        return pb.GetSettingsResponse(settings=_settings(self.core.settings))

    @rpc
    async def UpdateSettings(self, request: pb.UpdateSettingsRequest, context) -> pb.UpdateSettingsResponse:
        await self._who(context)
        s = request.settings
        new = Settings(
            offer_timeout=s.offer_timeout.ToNanoseconds() / 1e9,
            reject_cooldown=s.reject_cooldown.ToNanoseconds() / 1e9,
            stream_grace=s.stream_grace.ToNanoseconds() / 1e9,
        )
        saved = await self._write(admin.update_settings, new)
        return pb.UpdateSettingsResponse(settings=_settings(saved))

    # --- conversations -----------------------------------------------------------

    @rpc
    async def ListConversations(self, request: pb.AdminServiceListConversationsRequest, context):
        await self._who(context)
        views, token = await self.core.db.read(admin.list_conversations, request.page_size, request.page_token)
        return pb.AdminServiceListConversationsResponse(
            conversations=[convert.conversation(v) for v in views], next_page_token=token
        )

    @rpc
    async def ExportConversation(self, request: pb.ExportConversationRequest, context):
        who = await self._who(context)
        t = await self.core.transcript(who, request.conversation_id)
        return pb.ExportConversationResponse(
            conversation=convert.conversation(t.conversation), events=[convert.event(e) for e in t.events]
        )
