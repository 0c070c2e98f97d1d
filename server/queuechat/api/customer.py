"""chat.v1.CustomerService."""

from __future__ import annotations

from typing import Any

import grpc

from chat.v1 import customer_service_pb2 as pb
from chat.v1 import customer_service_pb2_grpc
from chat.v1 import resources_pb2 as rpb

from ..domain.core import Core
from ..domain.views import CustomerPrincipal
from . import convert, files
from .agent import stream_item
from .errors import authenticated, bearer, rpc, stream_of
from .peer import client_address


async def _customer(service: CustomerService, request: Any, context: grpc.aio.ServicerContext) -> CustomerPrincipal:
    """Customer tokens name their conversation: the call's conversation_id must be that one."""
    return service.core.authenticate_customer(bearer(context), request.conversation_id)


customer_call = authenticated(_customer)


class CustomerService(customer_service_pb2_grpc.CustomerServiceServicer):
    def __init__(self, core: Core):
        self.core = core

    @rpc
    async def ListQueues(self, request, context) -> pb.ListQueuesResponse:
        queues = await self.core.list_queues()
        return pb.ListQueuesResponse(queues=[rpb.Queue(queue_id=q.id, display_name=q.display_name) for q in queues])

    @rpc
    async def StartChat(self, request: pb.StartChatRequest, context) -> pb.StartChatResponse:
        client = client_address(context, self.core.config.rate_limits.trusted_proxies)
        started = await self.core.start_chat(
            request.queue_id, request.request_id, dict(request.variables), request.identity_token, client
        )
        return pb.StartChatResponse(
            conversation=convert.conversation(started.conversation), customer_token=started.customer_token
        )

    @customer_call
    async def GetConversation(self, request, context, who: CustomerPrincipal):
        view = await self.core.get_conversation(who, request.conversation_id)
        return pb.CustomerServiceGetConversationResponse(conversation=convert.conversation(view))

    # Authenticated here rather than by @customer_call (the same check, the same refusals inside the
    # wrapper), and the wrapper converts the domain stream's items: thousands of customers keep a stream
    # open, and each async generator layer is memory per stream.
    @stream_of(lambda item: stream_item(pb.CustomerServiceStreamConversationResponse, item))
    async def StreamConversation(self, request, context):
        who = await _customer(self, request, context)
        return self.core.conversation_stream(who, request.conversation_id, request.after_seq)

    @customer_call
    async def SetTyping(self, request, context, who: CustomerPrincipal):
        await self.core.set_typing(who, request.conversation_id, request.typing)
        return pb.CustomerServiceSetTypingResponse()

    @customer_call
    async def SendMessage(self, request, context, who: CustomerPrincipal):
        ev = await self.core.send_message(
            who, request.conversation_id, request.request_id, request.text, attachment_ids=list(request.attachment_ids)
        )
        return pb.CustomerServiceSendMessageResponse(event=convert.event(ev))

    @customer_call
    async def ChooseOption(
        self, request: pb.ChooseOptionRequest, context, who: CustomerPrincipal
    ) -> pb.ChooseOptionResponse:
        ev = await self.core.choose_option(who, request.conversation_id, request.menu_id, request.option_id)
        return pb.ChooseOptionResponse(event=convert.event(ev))

    @customer_call
    async def EndChat(self, request: pb.EndChatRequest, context, who: CustomerPrincipal) -> pb.EndChatResponse:
        view = await self.core.end_chat(who, request.conversation_id)
        return pb.EndChatResponse(conversation=convert.conversation(view))

    @customer_call
    async def MarkRead(self, request: pb.CustomerServiceMarkReadRequest, context, who: CustomerPrincipal):
        cursor = await self.core.mark_read(who, request.conversation_id, request.up_to_seq)
        return pb.CustomerServiceMarkReadResponse(read_cursor=convert.read_cursor(cursor))

    @customer_call
    async def RateConversation(
        self, request: pb.RateConversationRequest, context, who: CustomerPrincipal
    ) -> pb.RateConversationResponse:
        view = await self.core.rate(who, request.conversation_id, request.request_id, request.score, request.comment)
        return pb.RateConversationResponse(rating=convert.rating(view))

    @customer_call
    async def GetTranscript(
        self, request: pb.GetTranscriptRequest, context, who: CustomerPrincipal
    ) -> pb.GetTranscriptResponse:
        t = await self.core.transcript(who, request.conversation_id)
        return pb.GetTranscriptResponse(
            conversation=convert.conversation(t.conversation), events=[convert.event(e) for e in t.events]
        )

    @customer_call
    async def CreateUpload(self, request, context, who: CustomerPrincipal):
        return await files.create_upload(self.core, who, request, pb.CustomerServiceCreateUploadResponse, context)

    @customer_call
    async def UploadChunk(self, request, context, who: CustomerPrincipal):
        return await files.upload_chunk(self.core, who, request, pb.CustomerServiceUploadChunkResponse)

    @customer_call
    async def GetUpload(self, request, context, who: CustomerPrincipal):
        return await files.get_upload(self.core, who, request, pb.CustomerServiceGetUploadResponse)

    @customer_call
    async def CompleteUpload(self, request, context, who: CustomerPrincipal):
        return await files.complete_upload(self.core, who, request, pb.CustomerServiceCompleteUploadResponse)

    @customer_call
    async def DeleteUpload(self, request, context, who: CustomerPrincipal):
        return await files.delete_upload(self.core, who, request, pb.CustomerServiceDeleteUploadResponse)

    @customer_call
    async def DownloadAttachment(self, request, context, who: CustomerPrincipal):
        async for item in files.download(self.core, who, request, pb.CustomerServiceDownloadAttachmentResponse):
            yield item
