"""The baseline: a minimal grpc.aio relay with queuechat's call shapes, in memory, no database.

SendMessage appends to a list and fans out to StreamConversation subscribers;
UploadChunk discards bytes and DownloadAttachment streams them from memory.
It marks the ceiling of the transport on this machine: queuechat, with every
message persisted and checked, is measured against it in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
from collections import defaultdict

import grpc

from chat.v1 import customer_service_pb2 as pb
from chat.v1 import customer_service_pb2_grpc
from chat.v1 import resources_pb2 as rpb
from queuechat import eventloop

CHUNK = 1024 * 1024


class Relay(customer_service_pb2_grpc.CustomerServiceServicer):
    def __init__(self) -> None:
        self.events: defaultdict[str, list[rpb.ConversationEvent]] = defaultdict(list)
        self.subscribers: defaultdict[str, set[asyncio.Queue]] = defaultdict(set)
        self.blob = bytes(20 * CHUNK)

    async def StartChat(self, request, context):
        cid = f"relay-{len(self.events)}"
        self.events[cid] = []
        return pb.StartChatResponse(conversation=rpb.Conversation(conversation_id=cid), customer_token="relay")

    async def SendMessage(self, request, context):
        log = self.events[request.conversation_id]
        ev = rpb.ConversationEvent(
            conversation_id=request.conversation_id,
            seq=len(log) + 1,
            message=rpb.Message(text=request.text),
        )
        log.append(ev)
        for q in self.subscribers[request.conversation_id]:
            q.put_nowait(ev)
        return pb.CustomerServiceSendMessageResponse(event=ev)

    async def StreamConversation(self, request, context):
        q: asyncio.Queue = asyncio.Queue()
        subs = self.subscribers[request.conversation_id]
        subs.add(q)
        try:
            for ev in self.events[request.conversation_id][request.after_seq :]:
                yield pb.CustomerServiceStreamConversationResponse(event=ev)
            yield pb.CustomerServiceStreamConversationResponse(heartbeat=rpb.Heartbeat())
            while True:
                yield pb.CustomerServiceStreamConversationResponse(event=await q.get())
        finally:
            subs.discard(q)

    async def CreateUpload(self, request, context):
        return pb.CustomerServiceCreateUploadResponse(upload=rpb.Upload(upload_id="raw", size_bytes=request.size_bytes))

    async def UploadChunk(self, request, context):
        return pb.CustomerServiceUploadChunkResponse(received_bytes=request.offset + len(request.data))

    async def CompleteUpload(self, request, context):
        return pb.CustomerServiceCompleteUploadResponse(
            upload=rpb.Upload(upload_id="raw", attachment=rpb.Attachment(attachment_id="raw"))
        )

    async def DownloadAttachment(self, request, context):
        for off in range(0, len(self.blob), CHUNK):
            yield pb.CustomerServiceDownloadAttachmentResponse(
                chunk=rpb.AttachmentChunk(offset=off, data=self.blob[off : off + CHUNK])
            )


async def serve(port: int) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 4 * CHUNK)])
    customer_service_pb2_grpc.add_CustomerServiceServicer_to_server(Relay(), server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    print(f"relay listening on port {bound}", flush=True)
    await server.wait_for_termination()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    # The server's own event loop (uvloop unless QUEUECHAT_EVENT_LOOP=asyncio): both sides of a ratio on the same.
    eventloop.run(serve(parser.parse_args().port))
