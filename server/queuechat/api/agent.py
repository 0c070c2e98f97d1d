"""chat.v1.AgentService: validate, authenticate, translate; the domain does the rest."""

from __future__ import annotations

import grpc

from chat.v1 import agent_service_pb2 as pb
from chat.v1 import agent_service_pb2_grpc
from chat.v1 import resources_pb2 as rpb

from ..domain.core import Core
from ..domain.views import EventView, FeedEventView, Heartbeat
from ..errors import invalid
from . import convert, files
from .errors import bearer, rpc


class AgentService(agent_service_pb2_grpc.AgentServiceServicer):
    def __init__(self, core: Core):
        self.core = core

    async def _who(self, context: grpc.aio.ServicerContext):
        return await self.core.authenticate_agent(bearer(context))

    @rpc
    async def Login(self, request: pb.LoginRequest, context) -> pb.LoginResponse:
        view = await self.core.login(request.username, request.password, request.profile_id, request.ready)
        return convert.session(view)

    @rpc
    async def Logout(self, request, context) -> pb.LogoutResponse:
        await self.core.logout(await self._who(context))
        return pb.LogoutResponse()

    @rpc
    async def SetAgentState(self, request: pb.SetAgentStateRequest, context) -> pb.SetAgentStateResponse:
        who = await self._who(context)
        if request.state == pb.AGENT_STATE_UNSPECIFIED:
            raise invalid("STATE_REQUIRED", "state must be AGENT_STATE_READY or AGENT_STATE_NOT_READY.")
        ready = await self.core.set_ready(who, request.state == pb.AGENT_STATE_READY)
        return pb.SetAgentStateResponse(state=pb.AGENT_STATE_READY if ready else pb.AGENT_STATE_NOT_READY)

    @rpc
    async def StreamOffers(self, request: pb.StreamOffersRequest, context):
        who = await self._who(context)
        async for item in self.core.offer_feed(who, request.after_seq):
            if isinstance(item, FeedEventView):
                yield pb.StreamOffersResponse(event=convert.offer_event(item))
            elif isinstance(item, Heartbeat):
                yield pb.StreamOffersResponse(heartbeat=convert.heartbeat(item))

    @rpc
    async def AcceptOffer(self, request: pb.AcceptOfferRequest, context) -> pb.AcceptOfferResponse:
        view = await self.core.accept_offer(await self._who(context), request.offer_id)
        return pb.AcceptOfferResponse(conversation=convert.conversation(view))

    @rpc
    async def RejectOffer(self, request: pb.RejectOfferRequest, context) -> pb.RejectOfferResponse:
        await self.core.reject_offer(await self._who(context), request.offer_id)
        return pb.RejectOfferResponse()

    @rpc
    async def ListConversations(self, request: pb.ListConversationsRequest, context):
        views = await self.core.list_conversations(await self._who(context), request.include_closed)
        return pb.ListConversationsResponse(conversations=[convert.conversation(v) for v in views])

    @rpc
    async def GetConversation(self, request: pb.GetConversationRequest, context):
        view = await self.core.get_conversation(await self._who(context), request.conversation_id)
        return pb.GetConversationResponse(conversation=convert.conversation(view))

    @rpc
    async def StreamConversation(self, request: pb.StreamConversationRequest, context):
        who = await self._who(context)
        async for item in self.core.conversation_stream(who, request.conversation_id, request.after_seq):
            yield stream_item(pb.StreamConversationResponse, item)

    @rpc
    async def SendMessage(self, request: pb.SendMessageRequest, context) -> pb.SendMessageResponse:
        who = await self._who(context)
        ev = await self.core.send_message(
            who,
            request.conversation_id,
            request.request_id,
            request.text,
            private=request.visibility == rpb.VISIBILITY_AGENTS_ONLY,
            predefined_id=request.predefined_message_id,
            attachment_ids=list(request.attachment_ids),
        )
        return pb.SendMessageResponse(event=convert.event(ev))

    @rpc
    async def ListPredefinedMessages(self, request: pb.ListPredefinedMessagesRequest, context):
        rows = await self.core.list_predefined(await self._who(context), request.conversation_id)
        return pb.ListPredefinedMessagesResponse(
            predefined_messages=[
                rpb.PredefinedMessage(
                    predefined_message_id=r.id, title=r.title, body=r.body, queue_id=r.queue_id or "", profile_id=r.profile_id or ""
                )
                for r in rows
            ]
        )

    @rpc
    async def SendOfferMenu(self, request: pb.SendOfferMenuRequest, context) -> pb.SendOfferMenuResponse:
        who = await self._who(context)
        options = [(o.option_id, o.label) for o in request.options]
        ev = await self.core.send_offer_menu(who, request.conversation_id, request.request_id, request.prompt, options)
        return pb.SendOfferMenuResponse(event=convert.event(ev))

    @rpc
    async def InviteAgent(self, request: pb.InviteAgentRequest, context) -> pb.InviteAgentResponse:
        who = await self._who(context)
        inv = await self.core.invite_agent(
            who, request.conversation_id, request.request_id, request.agent_id, request.queue_id
        )
        return pb.InviteAgentResponse(invite=convert.invite(inv))

    @rpc
    async def CancelInvite(self, request: pb.CancelInviteRequest, context) -> pb.CancelInviteResponse:
        inv = await self.core.cancel_invite(await self._who(context), request.invite_id)
        return pb.CancelInviteResponse(invite=convert.invite(inv))

    @rpc
    async def LeaveConversation(self, request: pb.LeaveConversationRequest, context):
        await self.core.leave(await self._who(context), request.conversation_id)
        return pb.LeaveConversationResponse()

    @rpc
    async def CloseConversation(self, request: pb.CloseConversationRequest, context):
        view = await self.core.close(await self._who(context), request.conversation_id, request.confirm)
        return pb.CloseConversationResponse(conversation=convert.conversation(view))

    @rpc
    async def CreateUpload(self, request: pb.CreateUploadRequest, context) -> pb.CreateUploadResponse:
        return await files.create_upload(self.core, await self._who(context), request, pb.CreateUploadResponse)

    @rpc
    async def UploadChunk(self, request: pb.UploadChunkRequest, context) -> pb.UploadChunkResponse:
        return await files.upload_chunk(self.core, await self._who(context), request, pb.UploadChunkResponse)

    @rpc
    async def GetUpload(self, request: pb.GetUploadRequest, context) -> pb.GetUploadResponse:
        return await files.get_upload(self.core, await self._who(context), request, pb.GetUploadResponse)

    @rpc
    async def CompleteUpload(self, request: pb.CompleteUploadRequest, context) -> pb.CompleteUploadResponse:
        return await files.complete_upload(self.core, await self._who(context), request, pb.CompleteUploadResponse)

    @rpc
    async def DeleteUpload(self, request: pb.DeleteUploadRequest, context) -> pb.DeleteUploadResponse:
        return await files.delete_upload(self.core, await self._who(context), request, pb.DeleteUploadResponse)

    @rpc
    async def DownloadAttachment(self, request: pb.DownloadAttachmentRequest, context):
        who = await self._who(context)
        async for item in files.download(self.core, who, request, pb.DownloadAttachmentResponse):
            yield item


def stream_item(response_type, item):
    """One conversation-stream item as an Agent- or CustomerService stream response."""
    if isinstance(item, EventView):
        return response_type(event=convert.event(item))
    if isinstance(item, Heartbeat):
        return response_type(heartbeat=convert.heartbeat(item))
    return response_type(queue_position=convert.queue_position(item))
