"""Sample files and an uploader for the attachment tests."""

from __future__ import annotations

import hashlib
import struct
import zlib

from chat.v1 import agent_service_pb2 as agent_pb
from chat.v1 import customer_service_pb2 as cust_pb

MIB = 1024 * 1024


def png(width: int = 2, height: int = 2) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def pdf() -> bytes:
    return (
        b"%PDF-1.4\n1 0 obj<</Type/Catalog/Pages 2 0 R>>endobj\n"
        b"2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
    )


ELF = b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 56 + b"\x90" * 200


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class Uploader:
    """Drives the upload calls of an agent (md + agent stub) or a customer (customer stub)."""

    def __init__(self, stub, md, conversation_id: str, customer: bool):
        self.stub, self.md, self.conv, self.customer = stub, md, conversation_id, customer

    def _req(self, agent_type, customer_type, **kw):
        if self.customer:
            return customer_type(conversation_id=self.conv, **kw)
        return agent_type(**kw)

    async def create(self, name: str, size: int, content_type: str = "", request_id: str = ""):
        if self.customer:
            req = cust_pb.CustomerServiceCreateUploadRequest(
                conversation_id=self.conv, file_name=name, size_bytes=size, content_type=content_type, request_id=request_id
            )
        else:
            req = agent_pb.CreateUploadRequest(
                conversation_id=self.conv, file_name=name, size_bytes=size, content_type=content_type, request_id=request_id
            )
        return (await self.stub.CreateUpload(req, metadata=self.md)).upload

    async def chunk(self, upload_id: str, offset: int, data: bytes) -> int:
        req = self._req(agent_pb.UploadChunkRequest, cust_pb.CustomerServiceUploadChunkRequest, upload_id=upload_id, offset=offset, data=data)
        return (await self.stub.UploadChunk(req, metadata=self.md)).received_bytes

    async def get(self, upload_id: str):
        req = self._req(agent_pb.GetUploadRequest, cust_pb.CustomerServiceGetUploadRequest, upload_id=upload_id)
        return (await self.stub.GetUpload(req, metadata=self.md)).upload

    async def complete(self, upload_id: str, digest: str):
        req = self._req(agent_pb.CompleteUploadRequest, cust_pb.CustomerServiceCompleteUploadRequest, upload_id=upload_id, sha256=digest)
        return (await self.stub.CompleteUpload(req, metadata=self.md)).upload

    async def delete(self, upload_id: str) -> None:
        req = self._req(agent_pb.DeleteUploadRequest, cust_pb.CustomerServiceDeleteUploadRequest, upload_id=upload_id)
        await self.stub.DeleteUpload(req, metadata=self.md)

    async def send_chunks(self, upload_id: str, data: bytes, start: int = 0, step: int = MIB) -> None:
        for off in range(start, len(data), step):
            await self.chunk(upload_id, off, data[off : off + step])

    async def upload(self, data: bytes, name: str = "file.bin", content_type: str = ""):
        """Create, send, complete: the attachment."""
        up = await self.create(name, len(data), content_type)
        await self.send_chunks(up.upload_id, data)
        return (await self.complete(up.upload_id, sha(data))).attachment

    async def download(self, attachment_id: str, offset: int = 0):
        req = self._req(
            agent_pb.DownloadAttachmentRequest,
            cust_pb.CustomerServiceDownloadAttachmentRequest,
            attachment_id=attachment_id,
            offset=offset,
        )
        meta, parts = None, []
        async for item in self.stub.DownloadAttachment(req, metadata=self.md):
            if item.HasField("attachment"):
                meta = item.attachment
            else:
                assert item.chunk.offset == offset + sum(map(len, parts))
                parts.append(item.chunk.data)
        return meta, b"".join(parts)


def error_info(err) -> tuple[str, dict[str, str]]:
    """(reason, metadata) of the google.rpc.ErrorInfo in a failed call's status."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    status = rpc_status.from_call(err)
    for detail in status.details if status else []:
        info = error_details_pb2.ErrorInfo()
        if detail.Unpack(info):
            return info.reason, dict(info.metadata)
    return "", {}


# --- PDFs with and without active content -------------------------------------------------


def pdf_doc(catalog: bytes = b"", objects: tuple[bytes, ...] = (), header: bytes = b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n") -> bytes:
    """A small well-formed PDF: object 1 is the catalog (plus `catalog` entries), 2 the page tree,
    then `objects` as 3, 4, ... with a classic cross-reference table."""
    bodies = [b"<</Type/Catalog/Pages 2 0 R" + catalog + b">>", b"<</Type/Pages/Kids[]/Count 0>>", *objects]
    out, offsets = header, []
    for number, body in enumerate(bodies, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(bodies) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    return out + b"trailer\n<</Size %d/Root 1 0 R>>\nstartxref\n%d\n%%%%EOF\n" % (len(bodies) + 1, xref)


def pdf_stream(entries: bytes, data: bytes) -> bytes:
    """A stream object's body: its dictionary (entries plus /Length) and its data."""
    return b"<<" + entries + b"/Length %d>>\nstream\n" % len(data) + data + b"\nendstream"


def pdf_object_stream(objects: list[tuple[int, bytes]], filters: bytes = b"/Filter/FlateDecode", encode=zlib.compress) -> bytes:
    """An object stream (PDF 1.5) holding `objects`, compressed as modern writers do."""
    head = b" ".join(b"%d %d" % (n, sum(len(b) + 1 for _, b in objects[:i])) for i, (n, _) in enumerate(objects)) + b"\n"
    data = head + b"".join(body + b"\n" for _, body in objects)
    return pdf_stream(b"/Type/ObjStm/N %d/First %d" % (len(objects), len(head)) + filters, encode(data))
