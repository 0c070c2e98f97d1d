"""Attachments: limits at their boundaries, sniffing, resume, atomic messages, visibility, expiry."""

import asyncio
import os

import grpc
import pytest
from files import ELF, MIB, Uploader, pdf, png, sha
from harness import expect_error, is_event

from chat.v1 import agent_service_pb2 as agent_pb
from chat.v1 import customer_service_pb2 as cust_pb
from chat.v1 import resources_pb2 as rpb

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
LIMIT = 20 * MIB  # 20 MiB = 20,971,520 bytes


def uploaders(agent, cust):
    return (
        Uploader(agent.stub, agent.md, cust.id, customer=False),
        Uploader(cust.stub, cust.md, cust.id, customer=True),
    )


async def customer_send(cust, text="", ids=(), request_id=""):
    req = cust_pb.CustomerServiceSendMessageRequest(
        conversation_id=cust.id, text=text, attachment_ids=list(ids), request_id=request_id
    )
    return (await cust.stub.SendMessage(req, metadata=cust.md)).event


async def test_customer_sends_files_the_agent_downloads_them(server):
    agent, cust = await server.chat(variables={"name": "Ada"})
    a_up, c_up = uploaders(agent, cust)
    doc, pic = pdf(), png()
    att_pdf = await c_up.upload(doc, "invoice.pdf", "application/pdf")
    att_png = await c_up.upload(pic, "photo.png")  # no declared type: taken from the content
    assert (att_pdf.content_type, att_pdf.size_bytes, att_pdf.sha256) == ("application/pdf", len(doc), sha(doc))
    assert att_png.content_type == "image/png"

    ev = await customer_send(cust, "here you go", [att_pdf.attachment_id, att_png.attachment_id], "files-1")
    assert [a.file_name for a in ev.message.attachments] == ["invoice.pdf", "photo.png"]
    seen = await agent.streams[cust.id].wait_for(is_event("message", lambda e: e.message.text == "here you go"))
    assert [a.attachment_id for a in seen.event.message.attachments] == [att_pdf.attachment_id, att_png.attachment_id]

    meta, data = await a_up.download(att_pdf.attachment_id)
    assert data == doc and meta.sha256 == sha(doc)
    _, tail = await a_up.download(att_pdf.attachment_id, offset=10)  # resumed download
    assert tail == doc[10:]
    _, mine = await c_up.download(att_png.attachment_id)
    assert mine == pic

    # A retry of the same message is the same message, not a second one.
    again = await customer_send(cust, "here you go", [att_pdf.attachment_id, att_png.attachment_id], "files-1")
    assert again.seq == ev.seq
    # Transcript and the organisation's log list the files.
    t = await cust.transcript()
    listed = [a for e in t.events if e.HasField("message") for a in e.message.attachments]
    assert [(a.file_name, a.content_type, a.size_bytes, a.sha256) for a in listed] == [
        ("invoice.pdf", "application/pdf", len(doc), sha(doc)),
        ("photo.png", "image/png", len(pic), sha(pic)),
    ]


async def test_exactly_five_files_pass_a_sixth_is_refused(server):
    agent, cust = await server.chat(variables={"name": "Ada"})
    a_up, _ = uploaders(agent, cust)
    ids = [(await a_up.upload(f"note {i}\n".encode(), f"n{i}.txt")).attachment_id for i in range(5)]
    await expect_error(a_up.create("six.txt", 10), grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_UPLOADS")
    await expect_error(agent.send(cust.id, "six", attachment_ids=ids + ids[:1]), INVALID, "TOO_MANY_ATTACHMENTS")
    await expect_error(agent.send(cust.id, "dup", attachment_ids=ids[:2] + ids[:1]), INVALID, "DUPLICATE_ATTACHMENT")
    ev = await agent.send(cust.id, "", attachment_ids=ids)  # files alone need no text
    assert len(ev.message.attachments) == 5
    await expect_error(agent.send(cust.id, "again", attachment_ids=ids[:1]), PRECONDITION, "ATTACHMENT_ALREADY_SENT")
    # Sent, they no longer count: a new file can start.
    await a_up.create("next.txt", 10)


async def test_twenty_mib_passes_one_byte_more_is_refused(server):
    agent, cust = await server.chat(variables={"name": "Ada"})
    a_up, _ = uploaders(agent, cust)
    err = await expect_error(a_up.create("big.txt", LIMIT + 1), INVALID, "FILE_TOO_LARGE")
    assert "20,971,520 bytes (20 MiB)" in err.details()
    await expect_error(a_up.create("empty.txt", 0), INVALID, "EMPTY_FILE")

    big = b"a" * LIMIT
    att = await a_up.upload(big, "big.txt")
    assert att.size_bytes == LIMIT and att.content_type == "text/plain"

    # A file that lies about its size: declared 10 bytes, sends 11.
    up = await a_up.create("liar.txt", 10)
    await expect_error(a_up.chunk(up.upload_id, 0, b"x" * 11), INVALID, "SIZE_EXCEEDED")
    await a_up.chunk(up.upload_id, 0, b"x" * 6)
    await expect_error(a_up.chunk(up.upload_id, 6, b"x" * 5), INVALID, "SIZE_EXCEEDED")
    assert (await a_up.get(up.upload_id)).received_bytes == 6
    await expect_error(a_up.chunk(up.upload_id, 6, b"x" * (MIB + 1)), INVALID, "CHUNK_TOO_LARGE")


async def test_checksum_mismatch_is_refused(server):
    agent, cust = await server.chat(variables={"name": "Ada"})
    a_up, _ = uploaders(agent, cust)
    data = b"hello\n"
    up = await a_up.create("a.txt", len(data))
    await a_up.chunk(up.upload_id, 0, data)
    await expect_error(a_up.complete(up.upload_id, sha(b"other")), INVALID, "CHECKSUM_MISMATCH")
    await expect_error(a_up.complete(up.upload_id, "not-hex"), INVALID, "BAD_SHA256")
    assert (await a_up.get(up.upload_id)).state == rpb.UPLOAD_STATE_UPLOADING
    done = await a_up.complete(up.upload_id, sha(data))
    assert done.state == rpb.UPLOAD_STATE_COMPLETE
    assert (await a_up.complete(up.upload_id, sha(data))).attachment == done.attachment  # retry


@pytest.mark.parametrize(
    "name, data, declared, reason",
    [
        ("report.txt", ELF, "text/plain", "TYPE_NOT_ALLOWED"),  # a renamed executable
        ("setup.exe.png", b"MZ\x90\x00" + b"\x00" * 200, "", "TYPE_NOT_ALLOWED"),
        ("cut.pdf", pdf()[:60], "application/pdf", "PDF_TRUNCATED"),
        ("photo.jpg", png(), "image/jpeg", "TYPE_MISMATCH"),
        ("notes.pdf", b"just text\n", "application/pdf", "TYPE_MISMATCH"),
        ("noise.bin", bytes(range(256)) * 4, "", "TYPE_NOT_ALLOWED"),
        ("latin1.txt", "smörgåsbord\n".encode("latin-1"), "text/plain", "TYPE_NOT_ALLOWED"),
    ],
)
async def test_types_are_judged_by_content(server, name, data, declared, reason):
    agent, cust = await server.chat(variables={"name": "Ada"})
    _, c_up = uploaders(agent, cust)
    up = await c_up.create(name, len(data), declared)
    await c_up.send_chunks(up.upload_id, data)
    await expect_error(c_up.complete(up.upload_id, sha(data)), INVALID, reason)


async def test_text_kinds_and_declared_types(server):
    agent, cust = await server.chat(variables={"name": "Ada"})
    _, c_up = uploaders(agent, cust)
    csv = await c_up.upload("name;amount\nÅsa;12\n".encode(), "data.csv", "text/csv")
    assert csv.content_type == "text/csv"
    js = await c_up.upload(b'{"a": 1}', "a.json", "application/json")
    assert js.content_type == "application/json"
    await expect_error(c_up.create("x.exe", 10, "application/x-msdownload"), INVALID, "TYPE_NOT_ALLOWED")


async def test_interrupted_upload_resumes_from_the_confirmed_offset(server):
    agent, cust = await server.chat(variables={"name": "Ada"})
    _, c_up = uploaders(agent, cust)
    data = os.urandom(2 * MIB + 123)
    data = b"\x89PNG\r\n\x1a\n" + png()[8:] + data  # a PNG with trailing bytes: still a PNG
    up = await c_up.create("big.png", len(data), "image/png", request_id="up-1")
    assert up.max_chunk_bytes == MIB
    await c_up.chunk(up.upload_id, 0, data[:MIB])
    # The connection drops; the client asks where it stands.
    state = await c_up.get(up.upload_id)
    assert state.received_bytes == MIB and state.state == rpb.UPLOAD_STATE_UPLOADING
    # A retried CreateUpload with the same request_id is the same upload.
    assert (await c_up.create("big.png", len(data), "image/png", request_id="up-1")).upload_id == up.upload_id
    # Re-sending the last chunk is harmless; a gap is refused with the offset to use.
    assert await c_up.chunk(up.upload_id, 0, data[:MIB]) == MIB
    err = await expect_error(c_up.chunk(up.upload_id, MIB + 5, data[MIB + 5 : MIB + 10]), PRECONDITION, "OFFSET_MISMATCH")
    assert "offset 1048576" in err.details()
    await expect_error(c_up.complete(up.upload_id, sha(data)), PRECONDITION, "UPLOAD_INCOMPLETE")
    await c_up.send_chunks(up.upload_id, data, start=MIB)
    att = (await c_up.complete(up.upload_id, sha(data))).attachment
    assert att.sha256 == sha(data) and att.content_type == "image/png"


async def test_a_message_with_an_unfinished_file_is_refused_whole(server):
    agent, cust = await server.chat(variables={"name": "Ada"})
    _, c_up = uploaders(agent, cust)
    done = await c_up.upload(b"ready\n", "ready.txt")
    half = await c_up.create("half.txt", 10)
    await c_up.chunk(half.upload_id, 0, b"12345")
    await expect_error(
        customer_send(cust, "two files", [done.attachment_id, half.upload_id]), PRECONDITION, "ATTACHMENT_NOT_READY"
    )
    await expect_error(customer_send(cust, "ghost", ["nope"]), grpc.StatusCode.NOT_FOUND, "ATTACHMENT_NOT_FOUND")
    # Nothing half-sent is visible; the complete file can still go on a message.
    t = await cust.transcript()
    assert [e for e in t.events if e.HasField("message")] == []
    ev = await customer_send(cust, "one file", [done.attachment_id])
    assert len(ev.message.attachments) == 1


async def test_private_attachments_between_agents_never_reach_the_customer(server):
    a1, cust = await server.chat(variables={"name": "Ada"})
    a2 = await server.agent("agent2")
    await a1.invite(cust.id, agent_id="agent2")
    offer = await a2.wait_offer(cust.id, kind=agent_pb.OFFER_KIND_INVITE)
    await a2.accept(offer.offer_id)
    a2_up = Uploader(a2.stub, a2.md, cust.id, customer=False)
    a1_up, c_up = uploaders(a1, cust)

    secret = b"internal: refund approved up to 500\n"
    att = await a2_up.upload(secret, "approval.txt")
    ev = await a2.send(cust.id, "see attached", private=True, attachment_ids=[att.attachment_id])
    assert ev.visibility == rpb.VISIBILITY_AGENTS_ONLY
    _, got = await a1_up.download(att.attachment_id)
    assert got == secret

    await expect_error(c_up.download(att.attachment_id), grpc.StatusCode.NOT_FOUND, "ATTACHMENT_NOT_FOUND")
    t = await cust.transcript()
    assert all(not e.message.attachments for e in t.events if e.HasField("message"))
    await cust.send("marker")
    await cust.stream.wait_for(is_event("message", lambda e: e.message.text == "marker"))
    assert all(not e.message.attachments for e in cust.stream.events("message"))


async def test_a_customer_cannot_fetch_another_conversations_file(server):
    agent, cust = await server.chat(variables={"name": "Ada"})
    a_up, _ = uploaders(agent, cust)
    att = await a_up.upload(b"for Ada only\n", "ada.txt")
    await agent.send(cust.id, "file", attachment_ids=[att.attachment_id])
    other = await server.customer("support")
    o_up = Uploader(other.stub, other.md, other.id, customer=True)
    await expect_error(o_up.download(att.attachment_id), grpc.StatusCode.NOT_FOUND, "ATTACHMENT_NOT_FOUND")
    # Using the right conversation id with the wrong token does not help either.
    forged = Uploader(other.stub, other.md, cust.id, customer=True)
    await expect_error(forged.download(att.attachment_id), grpc.StatusCode.PERMISSION_DENIED, "NOT_YOUR_CONVERSATION")
    # Uploads are private to their uploader until sent.
    mine = await Uploader(cust.stub, cust.md, cust.id, customer=True).upload(b"draft\n", "draft.txt")
    await expect_error(a_up.download(mine.attachment_id), grpc.StatusCode.NOT_FOUND, "ATTACHMENT_NOT_FOUND")
    await expect_error(a_up.get(mine.attachment_id), grpc.StatusCode.NOT_FOUND, "UPLOAD_NOT_FOUND")


async def test_storage_is_content_addressed_with_no_user_names(server):
    agent, cust = await server.chat(variables={"name": "Ada"})
    a_up, c_up = uploaders(agent, cust)
    data = b"same bytes\n"
    await expect_error(c_up.upload(data, "passwd\x00.txt"), grpc.StatusCode.INVALID_ARGUMENT, "BAD_CHARACTERS")
    first = await c_up.upload(data, "../../etc/passwd.txt")
    second = await a_up.upload(data, "..\\secret\\copy.txt")
    assert first.file_name == "passwd.txt" and second.file_name == "copy.txt"
    root = server.data_dir / "files"
    stored = [p for p in root.rglob("*") if p.is_file()]
    assert [p.name for p in stored] == [sha(data)]  # one blob for both, named by hash


@pytest.mark.configure(limits={"upload_ttl": 0.2, "upload_sweep_interval": 0.05})
async def test_abandoned_uploads_expire_and_their_bytes_are_removed(server):
    agent, cust = await server.chat(variables={"name": "Ada"})
    _, c_up = uploaders(agent, cust)
    up = await c_up.create("left.txt", 100)
    await c_up.chunk(up.upload_id, 0, b"x" * 50)
    part = server.data_dir / "files" / "uploads" / up.upload_id
    assert part.exists()

    async def gone():
        while part.exists():
            await asyncio.sleep(0.02)

    await asyncio.wait_for(gone(), 10)
    await expect_error(c_up.get(up.upload_id), grpc.StatusCode.NOT_FOUND, "UPLOAD_NOT_FOUND")


async def test_an_upload_resumes_across_a_server_restart(server):
    agent, cust = await server.chat(variables={"name": "Ada"})
    data = ("line of text\n" * 200_000).encode()  # 2.6 MB
    c_up = Uploader(cust.stub, cust.md, cust.id, customer=True)
    up = await c_up.create("log.txt", len(data), "text/plain")
    await c_up.chunk(up.upload_id, 0, data[:MIB])
    await server.restart()
    c_up = Uploader(server.customer_stub, cust.md, cust.id, customer=True)
    state = await c_up.get(up.upload_id)
    assert state.received_bytes == MIB
    await c_up.send_chunks(up.upload_id, data, start=MIB)
    att = (await c_up.complete(up.upload_id, sha(data))).attachment
    assert (att.sha256, att.content_type, att.size_bytes) == (sha(data), "text/plain", len(data))
    _, back = await c_up.download(att.attachment_id)
    assert back == data


async def test_an_unsent_upload_can_be_deleted_and_frees_its_place(server):
    agent, cust = await server.chat(variables={"name": "Ada"})
    _, c_up = uploaders(agent, cust)
    refused = await c_up.create("x.exe", len(ELF))
    await c_up.send_chunks(refused.upload_id, ELF)
    await expect_error(c_up.complete(refused.upload_id, sha(ELF)), INVALID, "TYPE_NOT_ALLOWED")
    kept = [await c_up.upload(f"{i}\n".encode(), f"{i}.txt") for i in range(4)]
    await expect_error(c_up.create("six.txt", 3), grpc.StatusCode.RESOURCE_EXHAUSTED, "TOO_MANY_UPLOADS")

    await c_up.delete(refused.upload_id)  # the refused one goes, with its bytes
    assert not (server.data_dir / "files" / "uploads" / refused.upload_id).exists()
    await expect_error(c_up.get(refused.upload_id), grpc.StatusCode.NOT_FOUND, "UPLOAD_NOT_FOUND")
    await c_up.create("five.txt", 3)

    # A completed one can be dropped too (its blob goes when nothing else uses it); a sent one cannot.
    blob = server.data_dir / "files" / "blobs" / kept[0].sha256[:2] / kept[0].sha256
    assert blob.exists()
    await c_up.delete(kept[0].attachment_id)
    assert not blob.exists()
    await customer_send(cust, "sent", [kept[1].attachment_id])
    await expect_error(c_up.delete(kept[1].attachment_id), PRECONDITION, "ATTACHMENT_ALREADY_SENT")
    a_up, _ = uploaders(agent, cust)
    await expect_error(a_up.delete(kept[2].attachment_id), grpc.StatusCode.NOT_FOUND, "UPLOAD_NOT_FOUND")
