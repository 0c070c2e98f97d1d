"""Upload and download calls, shared by AgentService and CustomerService (their message types differ)."""

from __future__ import annotations

from typing import Any

from chat.v1 import resources_pb2 as rpb

from ..domain.core import Core
from . import convert
from .peer import client_address


async def create_upload(core: Core, who: Any, req: Any, response_type: type, context: Any) -> Any:
    client = client_address(context, core.config.rate_limits.trusted_proxies)
    up = await core.create_upload(
        who, req.conversation_id, req.request_id, req.file_name, req.size_bytes, req.content_type, client
    )
    return response_type(upload=convert.upload(up))


async def upload_chunk(core: Core, who: Any, req: Any, response_type: type) -> Any:
    received = await core.attachments.chunk(who, req.upload_id, req.offset, req.data)
    return response_type(received_bytes=received)


async def get_upload(core: Core, who: Any, req: Any, response_type: type) -> Any:
    return response_type(upload=convert.upload(await core.attachments.get(who, req.upload_id)))


async def complete_upload(core: Core, who: Any, req: Any, response_type: type) -> Any:
    return response_type(upload=convert.upload(await core.attachments.complete(who, req.upload_id, req.sha256)))


async def delete_upload(core: Core, who: Any, req: Any, response_type: type) -> Any:
    await core.attachments.delete(who, req.upload_id)
    return response_type()


async def download(core: Core, who: Any, req: Any, response_type: type):
    async for item in core.attachments.download(who, req.attachment_id, req.offset):
        if isinstance(item, dict):
            yield response_type(attachment=convert.attachment(item))
        else:
            offset, data = item
            yield response_type(chunk=rpb.AttachmentChunk(offset=offset, data=data))
