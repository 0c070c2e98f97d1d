"""chat.v1.AgentService: validate, authenticate, translate; the domain does the rest."""

from __future__ import annotations

import grpc
from google.protobuf.duration_pb2 import Duration

from chat.v1 import agent_service_pb2 as pb
from chat.v1 import agent_service_pb2_grpc
from chat.v1 import resources_pb2 as rpb

from ..domain.core import Core
from ..domain.views import AgentPrincipal, EventView, FeedEventView, Heartbeat, ReadCursorView, TypingView
from ..errors import invalid
from . import convert, files
from .errors import authenticated, bearer, rpc, stream_of
from .peer import client_address


async def _agent(service: AgentService, request: object, context: grpc.aio.ServicerContext) -> AgentPrincipal:
    return await service.core.authenticate_agent(bearer(context))


agent_call = authenticated(_agent)


class AgentService(agent_service_pb2_grpc.AgentServiceServicer):
    def __init__(self, core: Core):
        self.core = core

    @rpc
    async def Login(self, request: pb.LoginRequest, context) -> pb.LoginResponse:
        client = client_address(context, self.core.config.rate_limits.trusted_proxies)
        view = await self.core.login(request.username, request.password, request.profile_id, request.ready, client)
        return convert.session(view)

    @agent_call
    async def Logout(self, request, context, who: AgentPrincipal) -> pb.LogoutResponse:
        await self.core.logout(who)
        return pb.LogoutResponse()

    @agent_call
    async def SetAgentState(
        self, request: pb.SetAgentStateRequest, context, who: AgentPrincipal
    ) -> pb.SetAgentStateResponse:
        if request.state == pb.AGENT_STATE_UNSPECIFIED:
            raise invalid("STATE_REQUIRED", "state must be AGENT_STATE_READY or AGENT_STATE_NOT_READY.")
        ready = await self.core.set_ready(who, request.state == pb.AGENT_STATE_READY)
        return pb.SetAgentStateResponse(state=pb.AGENT_STATE_READY if ready else pb.AGENT_STATE_NOT_READY)

    @agent_call
    async def StreamOffers(self, request: pb.StreamOffersRequest, context, who: AgentPrincipal):
        async for item in self.core.offer_feed(who, request.after_seq):
            if isinstance(item, FeedEventView):
                yield pb.StreamOffersResponse(event=convert.offer_event(item))
            elif isinstance(item, Heartbeat):
                yield pb.StreamOffersResponse(heartbeat=convert.heartbeat(item))

    @agent_call
    async def AcceptOffer(self, request: pb.AcceptOfferRequest, context, who: AgentPrincipal) -> pb.AcceptOfferResponse:
        view = await self.core.accept_offer(who, request.offer_id)
        return pb.AcceptOfferResponse(conversation=convert.conversation(view))

    @agent_call
    async def RejectOffer(self, request: pb.RejectOfferRequest, context, who: AgentPrincipal) -> pb.RejectOfferResponse:
        await self.core.reject_offer(who, request.offer_id)
        return pb.RejectOfferResponse()

    @agent_call
    async def ListConversations(self, request: pb.ListConversationsRequest, context, who: AgentPrincipal):
        views = await self.core.list_conversations(who, request.include_closed)
        return pb.ListConversationsResponse(conversations=[convert.conversation(v) for v in views])

    @agent_call
    async def GetConversation(self, request: pb.GetConversationRequest, context, who: AgentPrincipal):
        view = await self.core.get_conversation(who, request.conversation_id)
        return pb.GetConversationResponse(conversation=convert.conversation(view))

    @stream_of(lambda item: stream_item(pb.StreamConversationResponse, item), _agent)
    async def StreamConversation(self, request: pb.StreamConversationRequest, context, who: AgentPrincipal):
        return self.core.conversation_stream(who, request.conversation_id, request.after_seq)

    @agent_call
    async def SetTyping(self, request: pb.SetTypingRequest, context, who: AgentPrincipal) -> pb.SetTypingResponse:
        private = request.visibility == rpb.VISIBILITY_AGENTS_ONLY
        await self.core.set_typing(who, request.conversation_id, request.typing, private)
        return pb.SetTypingResponse()

    @agent_call
    async def MarkRead(self, request: pb.MarkReadRequest, context, who: AgentPrincipal) -> pb.MarkReadResponse:
        cursor = await self.core.mark_read(who, request.conversation_id, request.up_to_seq)
        return pb.MarkReadResponse(read_cursor=convert.read_cursor(cursor))

    @agent_call
    async def SendMessage(self, request: pb.SendMessageRequest, context, who: AgentPrincipal) -> pb.SendMessageResponse:
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

    @agent_call
    async def ListPredefinedMessages(self, request: pb.ListPredefinedMessagesRequest, context, who: AgentPrincipal):
        rows = await self.core.list_predefined(who, request.conversation_id)
        return pb.ListPredefinedMessagesResponse(
            predefined_messages=[
                rpb.PredefinedMessage(
                    predefined_message_id=r.id,
                    title=r.title,
                    body=r.body,
                    queue_id=r.queue_id or "",
                    profile_id=r.profile_id or "",
                )
                for r in rows
            ]
        )

    @agent_call
    async def SendOfferMenu(
        self, request: pb.SendOfferMenuRequest, context, who: AgentPrincipal
    ) -> pb.SendOfferMenuResponse:
        options = [(o.option_id, o.label) for o in request.options]
        ev = await self.core.send_offer_menu(who, request.conversation_id, request.request_id, request.prompt, options)
        return pb.SendOfferMenuResponse(event=convert.event(ev))

    @agent_call
    async def InviteAgent(self, request: pb.InviteAgentRequest, context, who: AgentPrincipal) -> pb.InviteAgentResponse:
        inv = await self.core.invite_agent(
            who, request.conversation_id, request.request_id, request.agent_id, request.queue_id
        )
        return pb.InviteAgentResponse(invite=convert.invite(inv))

    @agent_call
    async def CancelInvite(
        self, request: pb.CancelInviteRequest, context, who: AgentPrincipal
    ) -> pb.CancelInviteResponse:
        inv = await self.core.cancel_invite(who, request.invite_id)
        return pb.CancelInviteResponse(invite=convert.invite(inv))

    @agent_call
    async def LeaveConversation(self, request: pb.LeaveConversationRequest, context, who: AgentPrincipal):
        await self.core.leave(who, request.conversation_id)
        return pb.LeaveConversationResponse()

    @agent_call
    async def CloseConversation(self, request: pb.CloseConversationRequest, context, who: AgentPrincipal):
        view = await self.core.close(
            who, request.conversation_id, request.confirm, request.wrap_up_code_id, request.wrap_up_note
        )
        return pb.CloseConversationResponse(conversation=convert.conversation(view))

    @agent_call
    async def ListWrapUpCodes(self, request: pb.ListWrapUpCodesRequest, context, who: AgentPrincipal):
        codes, required = await self.core.agent_wrap_up_codes(who, request.conversation_id)
        return pb.ListWrapUpCodesResponse(
            wrap_up_codes=[convert.wrap_up_code(c) for c in codes], wrap_up_required=required
        )

    # --- supervisors -------------------------------------------------------------

    @agent_call
    async def ListLiveConversations(self, request: pb.ListLiveConversationsRequest, context, who: AgentPrincipal):
        rows = await self.core.live_conversations(who, request.queue_id)
        return pb.ListLiveConversationsResponse(
            live_conversations=[
                pb.LiveConversation(
                    conversation=convert.conversation(r.conversation),
                    waiting_time=_duration(r.waiting),
                    handling_time=_duration(r.handling),
                    monitors=[convert.participant(m) for m in r.monitors],
                )
                for r in rows
            ]
        )

    @agent_call
    async def MonitorConversation(self, request: pb.MonitorConversationRequest, context, who: AgentPrincipal):
        async for item in self.core.monitor(who, request.conversation_id, request.after_seq):
            yield stream_item(pb.MonitorConversationResponse, item)

    @agent_call
    async def Whisper(self, request: pb.WhisperRequest, context, who: AgentPrincipal) -> pb.WhisperResponse:
        ev = await self.core.whisper(who, request.conversation_id, request.request_id, request.text)
        return pb.WhisperResponse(event=convert.event(ev))

    @agent_call
    async def BargeIn(self, request: pb.BargeInRequest, context, who: AgentPrincipal) -> pb.BargeInResponse:
        view = await self.core.barge_in(who, request.conversation_id)
        return pb.BargeInResponse(conversation=convert.conversation(view))

    @agent_call
    async def CreateUpload(
        self, request: pb.CreateUploadRequest, context, who: AgentPrincipal
    ) -> pb.CreateUploadResponse:
        return await files.create_upload(self.core, who, request, pb.CreateUploadResponse, context)

    @agent_call
    async def UploadChunk(self, request: pb.UploadChunkRequest, context, who: AgentPrincipal) -> pb.UploadChunkResponse:
        return await files.upload_chunk(self.core, who, request, pb.UploadChunkResponse)

    @agent_call
    async def GetUpload(self, request: pb.GetUploadRequest, context, who: AgentPrincipal) -> pb.GetUploadResponse:
        return await files.get_upload(self.core, who, request, pb.GetUploadResponse)

    @agent_call
    async def CompleteUpload(
        self, request: pb.CompleteUploadRequest, context, who: AgentPrincipal
    ) -> pb.CompleteUploadResponse:
        return await files.complete_upload(self.core, who, request, pb.CompleteUploadResponse)

    @agent_call
    async def DeleteUpload(
        self, request: pb.DeleteUploadRequest, context, who: AgentPrincipal
    ) -> pb.DeleteUploadResponse:
        return await files.delete_upload(self.core, who, request, pb.DeleteUploadResponse)

    @agent_call
    async def DownloadAttachment(self, request: pb.DownloadAttachmentRequest, context, who: AgentPrincipal):
        async for item in files.download(self.core, who, request, pb.DownloadAttachmentResponse):
            yield item


def _duration(seconds: float) -> Duration:
    d = Duration()
    d.FromNanoseconds(int(seconds * 1e9))
    return d


def stream_item(response_type, item):
    """One conversation-stream item as an Agent- or CustomerService stream (or monitor) response."""
    if isinstance(item, EventView):
        return response_type(event=convert.event(item))
    if isinstance(item, Heartbeat):
        return response_type(heartbeat=convert.heartbeat(item))
    if isinstance(item, TypingView):
        return response_type(typing=convert.typing(item))
    if isinstance(item, ReadCursorView):
        return response_type(read_cursor=convert.read_cursor(item))
    return response_type(queue_position=convert.queue_position(item))
