"""chat.v1.AdminService."""

from __future__ import annotations

from google.protobuf.duration_pb2 import Duration

from chat.v1 import admin_service_pb2 as pb
from chat.v1 import admin_service_pb2_grpc

from ..domain.core import Core
from . import convert
from .errors import bearer, rpc


def _duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


class AdminService(admin_service_pb2_grpc.AdminServiceServicer):
    def __init__(self, core: Core):
        self.core = core

    async def _who(self, context):
        return await self.core.authenticate_admin(bearer(context))

    @rpc
    async def Login(self, request: pb.AdminServiceLoginRequest, context) -> pb.AdminServiceLoginResponse:
        token = await self.core.admin_login(request.username, request.password)
        return pb.AdminServiceLoginResponse(admin_token=token)

    @rpc
    async def GetSettings(self, request, context) -> pb.GetSettingsResponse:
        await self._who(context)
        s = self.core.settings
        return pb.GetSettingsResponse(
            settings=pb.Settings(
                offer_timeout=_duration(s.offer_timeout),
                reject_cooldown=_duration(s.reject_cooldown),
                stream_grace=_duration(s.stream_grace),
            )
        )

    @rpc
    async def ExportConversation(self, request: pb.ExportConversationRequest, context):
        who = await self._who(context)
        t = await self.core.transcript(who, request.conversation_id)
        return pb.ExportConversationResponse(
            conversation=convert.conversation(t.conversation), events=[convert.event(e) for e in t.events]
        )
