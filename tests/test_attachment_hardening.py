"""Attachment hardening: shared blobs survive deletes and expiry in any interleaving, the live count
in UPLOAD_INCOMPLETE, NOT_FOUND for attachments out of reach, safe file names, PDFs without
active content."""

import asyncio
import base64
import random
import time
import zlib
from datetime import timedelta
from pathlib import Path

import grpc
import pytest
from files import (
    MIB,
    Uploader,
    error_info,
    pdf,
    pdf_doc,
    pdf_object_stream,
    pdf_stream,
    png,
    sha,
)
from harness import expect_error
from test_web_page import browser, context, page, site  # noqa: F401  (fixtures for the page test)
from test_web_page import chat as web_chat

from chat.v1 import customer_service_pb2 as cust_pb
from queuechat.domain import filetypes
from queuechat.domain.tx import Tx
from queuechat.store.blobs import Scanner
from queuechat.store.models import Attachment
from queuechat_agent.client import AgentClient

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
NOT_FOUND = grpc.StatusCode.NOT_FOUND


def uploaders(agent, cust):
    return (
        Uploader(agent.stub, agent.md, cust.id, customer=False),
        Uploader(cust.stub, cust.md, cust.id, customer=True),
    )


async def customer_send(cust, text="", ids=()):
    req = cust_pb.CustomerServiceSendMessageRequest(conversation_id=cust.id, text=text, attachment_ids=list(ids))
    return (await cust.stub.SendMessage(req, metadata=cust.md)).event


def _expire_now(tx: Tx, upload_id: str) -> None:
    row = tx.session.get(Attachment, upload_id)
    assert row is not None
    row.expires_at = tx.now - timedelta(seconds=1)
    tx.session.add(row)


async def _jitter(rng: random.Random) -> None:
    await asyncio.sleep(rng.choice([0, 0, 0.0005, 0.001, 0.002, 0.004]))


# --- 1. one blob, several uploads ---------------------------------------------------------


async def _race_round(server, cust, c_up, a_up, rng, i, remove_first):
    """A completed upload of some bytes goes (by remove_first) while a second upload of the same
    bytes completes; the second must stay downloadable, before and after it is sent."""
    data = f"round {i}: the same bytes twice\n".encode() * 50
    first = await c_up.upload(data, "first.txt")
    second = await c_up.create("second.txt", len(data))
    await c_up.send_chunks(second.upload_id, data)

    async def complete():
        await _jitter(rng)
        return await c_up.complete(second.upload_id, sha(data))

    async def remove():
        await _jitter(rng)
        await remove_first(first.attachment_id)

    done, _ = await asyncio.gather(complete(), remove())
    assert done.attachment.sha256 == sha(data)
    _, mine = await c_up.download(second.upload_id)
    assert mine == data, f"round {i}: the uploader's own copy lost its bytes"
    await customer_send(cust, f"round {i}", [second.upload_id])
    _, theirs = await a_up.download(second.upload_id)
    assert theirs == data, f"round {i}: the sent copy lost its bytes"


async def test_deleting_an_upload_races_completing_one_with_the_same_bytes(server):
    agent, cust = await server.chat(variables={"name": "Ada"})
    a_up, c_up = uploaders(agent, cust)
    rng = random.Random(1)
    for i in range(40):
        await _race_round(server, cust, c_up, a_up, rng, i, c_up.delete)


async def test_expiring_an_upload_races_completing_one_with_the_same_bytes(server):
    agent, cust = await server.chat(variables={"name": "Ada"})
    a_up, c_up = uploaders(agent, cust)
    rng = random.Random(2)

    async def expire(upload_id):
        await server.core.write(_expire_now, upload_id)
        await server.core.attachments.sweep()

    for i in range(40):
        await _race_round(server, cust, c_up, a_up, rng, i, expire)


@pytest.mark.parametrize("how", ["delete", "expire"])
async def test_a_slow_removal_never_takes_a_blob_a_new_upload_claimed(server, how):
    """The worst interleaving, forced: the removal decided on the database before the second upload
    completed, and its file removal lands after that completion."""
    agent, cust = await server.chat(variables={"name": "Ada"})
    a_up, c_up = uploaders(agent, cust)
    blobs = server.core.attachments.blobs
    data = b"shared bytes\n" * 100
    first = await c_up.upload(data, "first.txt")
    second = await c_up.create("second.txt", len(data))
    await c_up.send_chunks(second.upload_id, data)

    removing = asyncio.Event()
    real_remove = blobs.remove_blob

    def slow_remove(sha256):
        removing.set()  # from the worker thread: only read once the removal is over
        time.sleep(0.3)
        real_remove(sha256)

    blobs.remove_blob = slow_remove
    try:
        if how == "delete":
            removal = asyncio.ensure_future(c_up.delete(first.attachment_id))
        else:
            await server.core.write(_expire_now, first.attachment_id)
            removal = asyncio.ensure_future(server.core.attachments.sweep())
        # Complete while the removal is under way (or, once fixed, waiting for it).
        await asyncio.sleep(0.1)
        done = await c_up.complete(second.upload_id, sha(data))
        await removal
    finally:
        blobs.remove_blob = real_remove
    assert removing.is_set()
    assert done.attachment.sha256 == sha(data)
    await customer_send(cust, "sent", [second.upload_id])
    _, got = await a_up.download(second.upload_id)
    assert got == data
    assert blobs.blob_path(sha(data)).exists()


async def test_an_upload_that_expires_while_completing_leaves_no_bytes_behind(server):
    agent, cust = await server.chat(variables={"name": "Ada"})
    _, c_up = uploaders(agent, cust)
    blobs = server.core.attachments.blobs
    data = b"late\n" * 100
    up = await c_up.create("late.txt", len(data))
    await c_up.send_chunks(up.upload_id, data)
    await server.core.write(_expire_now, up.upload_id)
    loop = asyncio.get_running_loop()
    real_commit = blobs.commit

    def commit_then_sweep(upload_id, sha256):
        real_commit(upload_id, sha256)
        # The sweeper runs between the bytes moving in and the row being marked complete.
        asyncio.run_coroutine_threadsafe(server.core.attachments.sweep(), loop).result(10)

    blobs.commit = commit_then_sweep
    try:
        await expect_error(c_up.complete(up.upload_id, sha(data)), NOT_FOUND, "UPLOAD_NOT_FOUND")
    finally:
        blobs.commit = real_commit
    assert not blobs.blob_path(sha(data)).exists()
    assert [p for p in (server.data_dir / "files").rglob("*") if p.is_file()] == []


async def test_the_last_upload_of_some_bytes_takes_its_blob_with_it(server):
    agent, cust = await server.chat(variables={"name": "Ada"})
    _, c_up = uploaders(agent, cust)
    data = b"only once\n"
    one = await c_up.upload(data, "one.txt")
    two = await c_up.upload(data, "two.txt")
    path = server.core.attachments.blobs.blob_path(sha(data))
    await c_up.delete(one.attachment_id)
    assert path.exists()
    await server.core.write(_expire_now, two.attachment_id)
    await server.core.attachments.sweep()
    assert not path.exists()


# --- 2. UPLOAD_INCOMPLETE says what arrived -------------------------------------------------


async def test_upload_incomplete_reports_the_bytes_received(server):
    agent, cust = await server.chat(variables={"name": "Ada"})
    _, c_up = uploaders(agent, cust)
    data = b"0123456789" * 100_000  # 1,000,000 bytes
    up = await c_up.create("big.txt", len(data), "text/plain")
    await c_up.send_chunks(up.upload_id, data[:700_000], step=100_000)
    assert (await c_up.get(up.upload_id)).received_bytes == 700_000
    err = await expect_error(c_up.complete(up.upload_id, sha(data)), PRECONDITION, "UPLOAD_INCOMPLETE")
    assert error_info(err)[1]["received_bytes"] == "700000"
    assert "700,000 of 1,000,000" in err.details()

    # After a restart (nothing in memory), the bytes on disk count.
    await server.restart()
    c_up = Uploader(server.customer_stub, cust.md, cust.id, customer=True)
    err = await expect_error(c_up.complete(up.upload_id, sha(data)), PRECONDITION, "UPLOAD_INCOMPLETE")
    assert error_info(err)[1]["received_bytes"] == "700000"
    # Following the metadata finishes the upload.
    await c_up.send_chunks(up.upload_id, data, start=int(error_info(err)[1]["received_bytes"]), step=100_000)
    assert (await c_up.complete(up.upload_id, sha(data))).attachment.size_bytes == len(data)


# --- 3. attachments out of reach are NOT_FOUND ---------------------------------------------


async def test_attachments_of_other_conversations_are_not_found_and_reveal_nothing(server):
    agent, cust = await server.chat(variables={"name": "Ada"})
    a_up, _ = uploaders(agent, cust)
    att = await a_up.upload(b"for Ada only\n", "ada.txt")
    await agent.send(cust.id, "file", attachment_ids=[att.attachment_id])

    # Another customer, through their own conversation.
    other = await server.customer("support")
    o_up = Uploader(other.stub, other.md, other.id, customer=True)
    err = await expect_error(o_up.download(att.attachment_id), NOT_FOUND, "ATTACHMENT_NOT_FOUND")
    reason, metadata = error_info(err)
    assert cust.id not in err.details() and cust.id not in "".join(metadata.values()), (err.details(), metadata)

    # An agent who is not in the conversation.
    outsider = await server.agent("agent2")
    x_up = Uploader(outsider.stub, outsider.md, cust.id, customer=False)
    err = await expect_error(x_up.download(att.attachment_id), NOT_FOUND, "ATTACHMENT_NOT_FOUND")
    reason, metadata = error_info(err)
    assert cust.id not in err.details() and cust.id not in "".join(metadata.values()), (err.details(), metadata)

    # The same answer as for an attachment that does not exist at all.
    missing = await expect_error(x_up.download("no-such-attachment"), NOT_FOUND, "ATTACHMENT_NOT_FOUND")
    assert error_info(missing)[1] == metadata
    # Those who may see it still can.
    assert (await a_up.download(att.attachment_id))[1] == b"for Ada only\n"
    c_up = Uploader(cust.stub, cust.md, cust.id, customer=True)
    assert (await c_up.download(att.attachment_id))[1] == b"for Ada only\n"


# --- 4. file names that match the content ---------------------------------------------------

PAGE = b"<html><body><script>alert(document.cookie)</script></body></html>\n"
SVG = b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"><rect width="1" height="1"/></svg>\n'


@pytest.mark.parametrize(
    "name, data, declared, expected",
    [
        ("page.html", PAGE, "", "page.txt"),
        ("page.HTM", PAGE, "text/plain", "page.txt"),
        ("logo.svg", SVG, "", "logo.txt"),
        ("invoice.hta", PAGE, "", "invoice.txt"),
        ("update.bat", b"del /q C:\\Users\\*\r\n", "", "update.txt"),
        ("run.ps1", b"Start-Process calc\n", "", "run.txt"),
        ("page.html. . .", PAGE, "", "page.txt"),  # Windows drops trailing dots and spaces
        ("README", b"read me\n", "", "README.txt"),
        ("notes.TXT", b"notes\n", "", "notes.TXT"),
        ("server.log", b"12:00 started\n", "", "server.log"),
        ("version 1.2", b"text\n", "", "version 1.2.txt"),
        ("Mr. Smith's letter", b"Dear\n", "", "Mr. Smith's letter.txt"),
        ("data.csv", b"a;b\n1;2\n", "text/csv", "data.csv"),
        ("data.xlsx", b"a;b\n1;2\n", "text/csv", "data.csv"),
        ("a.json", b'{"a": 1}', "application/json", "a.json"),
        ("photo.jpg", png(), "", "photo.png"),
        ("photo.exe", png(), "image/png", "photo.png"),
        ("photo", png(), "", "photo.png"),
        ("scan", pdf(), "", "scan.pdf"),
        ("report.pdf.exe", pdf(), "application/pdf", "report.pdf.pdf"),
        ("Report.PDF", pdf(), "", "Report.PDF"),
        ("a:b|c?.html", PAGE, "", "a_b_c_.txt"),
        ("x" * 300 + ".html", PAGE, "", "x" * 196 + ".txt"),
    ],
)
async def test_file_names_get_the_extension_of_their_content(server, name, data, declared, expected):
    agent, cust = await server.chat(variables={"name": "Ada"})
    a_up, c_up = uploaders(agent, cust)
    att = await c_up.upload(data, name, declared)
    assert att.file_name == expected
    assert (await c_up.get(att.attachment_id)).file_name == expected
    ev = await customer_send(cust, "", [att.attachment_id])
    assert [a.file_name for a in ev.message.attachments] == [expected]
    meta, got = await a_up.download(att.attachment_id)
    assert (meta.file_name, got) == (expected, data)


async def test_the_agent_client_and_the_page_save_under_the_safe_name(server, page, tmp_path):  # noqa: F811
    agent, cid, _ = await web_chat(page, server)
    # The agent sends the customer text named page.html: the page saves it as page.txt.
    sent = await Uploader(agent.stub, agent.md, cid, customer=False).upload(PAGE, "page.html")
    await agent.send(cid, "See the page", attachment_ids=[sent.attachment_id])
    button = page.get_by_role("button", name="Download page.txt")
    async with page.expect_download() as info:
        await button.click()
    saved = await info.value
    assert saved.suggested_filename == "page.txt"
    assert await asyncio.to_thread(Path(await saved.path()).read_bytes) == PAGE

    # The agent client (a new login of the same agent) saves it under the same name.
    client = AgentClient(server.address)
    await client.login("agent1", "pw1", "both")
    try:
        path = await client.download(sent.attachment_id, tmp_path)
    finally:
        await client.aclose()
    assert (path.name, path.read_bytes()) == ("page.txt", PAGE)


def test_safe_names_are_stable():
    for ctype in sorted(filetypes.ALLOWED):
        for name in ["a", "a.txt", "page.html", "b.png", "c.PDF", "d.tar.gz", "e.", "x" * 250 + ".html", ".html"]:
            once = filetypes.safe_name(name, ctype)
            assert filetypes.safe_name(once, ctype) == once
            assert len(once) <= 200 and once.lower().endswith(filetypes.EXTENSIONS[ctype])


# --- 4. PDFs without active content --------------------------------------------------------

JS_ACTION = b"<</S/JavaScript/JS(app.alert\\(1\\))>>"
PAGE_AA = b"<</Type/Page/AA<</O 9 0 R>>>>"
IMAGE = bytes(random.Random(3).randrange(256) for _ in range(200_000))
# Random image bytes with what looks like /JS and /AA names inside: data, not dictionaries.
IMAGE_WITH_NAMES = IMAGE[:1000] + b"/JS (x) /AA << >> /EF" + IMAGE[1000:]
BENIGN_OBJECTS = [(4, b"<</Type/Font/Subtype/Type1/BaseFont/Helvetica>>"), (5, b"<</Title(Notes /JS and /AA)>>")]

ACTIVE = {
    "open-action-js": pdf_doc(b"/OpenAction 3 0 R", (JS_ACTION,)),
    "inline-open-action": pdf_doc(b"/OpenAction" + JS_ACTION),
    "names-javascript": pdf_doc(b"/Names<</JavaScript 3 0 R>>", (b"<</Names[(a) 4 0 R]>>", JS_ACTION)),
    "js-only": pdf_doc(b"/OpenAction 3 0 R", (b"<</S/Rendition/JS 4 0 R>>", pdf_stream(b"", b"app.alert(1)"))),
    "launch": pdf_doc(b"/OpenAction 3 0 R", (b"<</S/Launch/F(cmd.exe)>>",)),
    "additional-actions": pdf_doc(b"/AA<</WC 3 0 R>>", (b"<</S/URI/URI(http://example.com)>>",)),
    "embedded-file": pdf_doc(
        b"/Names<</EmbeddedFiles<</Names[(x.exe) 3 0 R]>>>>",
        (b"<</Type/Filespec/F(x.exe)/EF<</F 4 0 R>>>>", pdf_stream(b"/Type/EmbeddedFile", b"MZ\x90\x00")),
    ),
    "rich-media": pdf_doc(b"", (b"<</Type/Annot/Subtype/RichMedia/RichMediaContent<<>>>>",)),
    "escaped-name": pdf_doc(b"/OpenAction 3 0 R", (b"<</S/J#61vaScript/J#53(app.alert\\(1\\))>>",)),
    "compressed-object-stream": pdf_doc(b"/OpenAction 4 0 R", (pdf_object_stream([(4, JS_ACTION)]),)),
    "compressed-additional-actions": pdf_doc(b"", (pdf_object_stream([(4, b"<</Type/Page/AA<</O 5 0 R>>>>")]),)),
    "escaped-object-stream-type": pdf_doc(
        b"",
        (pdf_object_stream([(4, b"<</AA 5 0 R>>")]).replace(b"/First", b"/Fir#73t").replace(b"/ObjStm", b"/Obj#53tm"),),
    ),
    "after-an-image": pdf_doc(b"", (pdf_stream(b"/Subtype/Image/Filter/DCTDecode", IMAGE), PAGE_AA)),
    "after-a-string-with-parens": pdf_doc(b"", (b"<</Title(a \\) (nested\\\\) b)>>", PAGE_AA)),
    "after-a-comment": pdf_doc(b"", (b"% (not a string\n" + PAGE_AA,)),
    "hidden-action-in-a-string": pdf_doc(b"/OpenAction 3 0 R", (b"<</Title(4 0 obj <</S /JavaScript /JS(x)>> endobj)>>",)),
}
UNCHECKABLE = {
    "hex-encoded-object-stream": pdf_doc(
        b"", (pdf_object_stream([(4, JS_ACTION)], b"/Filter/ASCIIHexDecode", lambda d: d.hex().encode() + b">"),)
    ),
    "base85-and-flate": pdf_doc(
        b"",
        (
            pdf_object_stream(
                [(4, JS_ACTION)], b"/Filter[/ASCII85Decode/FlateDecode]", lambda d: base64.a85encode(zlib.compress(d))
            ),
        ),
    ),
    "flate-twice": pdf_doc(
        b"", (pdf_object_stream([(4, JS_ACTION)], b"/Filter[/FlateDecode/FlateDecode]", lambda d: zlib.compress(zlib.compress(d))),)
    ),
    "with-predictor": pdf_doc(b"", (pdf_object_stream([(4, JS_ACTION)], b"/Filter/FlateDecode/DecodeParms<</Predictor 12/Columns 4>>"),)),
    "encrypted-object-stream": pdf_doc(
        b"", (pdf_object_stream([(4, JS_ACTION)], b"/Filter/FlateDecode", lambda d: random.Random(4).randbytes(16) + zlib.compress(d)[::-1]),)
    ),
}
BENIGN = {
    "plain": pdf(),
    "object-stream": pdf_doc(b"", (pdf_object_stream(BENIGN_OBJECTS),)),
    "uncompressed-object-stream": pdf_doc(b"", (pdf_object_stream(BENIGN_OBJECTS, b"", lambda d: d),)),
    "image-with-name-like-bytes": pdf_doc(b"", (pdf_stream(b"/Subtype/Image/Filter/DCTDecode", IMAGE_WITH_NAMES),)),
    "flate-image": pdf_doc(b"", (pdf_stream(b"/Subtype/Image/Filter/FlateDecode", zlib.compress(IMAGE_WITH_NAMES)),)),
    "names-in-strings-and-comments": pdf_doc(b"/Lang(en /JS /AA)", (b"% a comment with /AA and /EF\n<</Title(/JS)>>",)),
    "link-and-open-action-to-a-page": pdf_doc(b"/OpenAction[2 0 R/Fit]", (b"<</S/URI/URI(https://example.com/JavaScript)>>",)),
    "similar-names": pdf_doc(b"/JSON 1/AAA 2/EFX 3/Launcher 4", ()),
}


@pytest.mark.parametrize("name", sorted(ACTIVE))
async def test_pdfs_with_active_content_are_refused(server, name):
    await _refused(server, ACTIVE[name], "PDF_ACTIVE_CONTENT")


@pytest.mark.parametrize("name", sorted(UNCHECKABLE))
async def test_pdfs_the_server_cannot_check_are_refused(server, name):
    await _refused(server, UNCHECKABLE[name], "PDF_UNCHECKABLE")


async def _refused(server, data, reason):
    agent, cust = await server.chat(variables={"name": "Ada"})
    _, c_up = uploaders(agent, cust)
    up = await c_up.create("doc.pdf", len(data), "application/pdf")
    await c_up.send_chunks(up.upload_id, data, step=97)  # markers cut across chunks
    err = await expect_error(c_up.complete(up.upload_id, sha(data)), INVALID, reason)
    assert error_info(err)[0] == reason
    # After a restart the whole-file scan decides the same.
    await server.restart()
    c_up = Uploader(server.customer_stub, cust.md, cust.id, customer=True)
    await expect_error(c_up.complete(up.upload_id, sha(data)), INVALID, reason)


@pytest.mark.parametrize("name", sorted(BENIGN))
async def test_pdfs_without_active_content_pass(server, name):
    agent, cust = await server.chat(variables={"name": "Ada"})
    _, c_up = uploaders(agent, cust)
    data = BENIGN[name]
    up = await c_up.create("doc.pdf", len(data), "application/pdf")
    await c_up.send_chunks(up.upload_id, data, step=MIB if len(data) > 10_000 else 13)
    att = (await c_up.complete(up.upload_id, sha(data))).attachment
    assert att.content_type == "application/pdf"


def _verdict(data: bytes, sizes) -> object:
    scanner = Scanner()
    at = 0
    for n in sizes:
        scanner.update(data[at : at + n])
        at += n
    scanner.update(data[at:])
    return scanner.result().pdf_problem


@pytest.mark.parametrize("name", sorted(ACTIVE) + sorted(UNCHECKABLE) + sorted(BENIGN))
def test_the_pdf_verdict_does_not_depend_on_chunking(name):
    data = {**ACTIVE, **UNCHECKABLE, **BENIGN}[name]
    whole = _verdict(data, [])
    expected = "PDF_ACTIVE_CONTENT" if name in ACTIVE else "PDF_UNCHECKABLE" if name in UNCHECKABLE else None
    assert (whole[0] if whole else None) == expected
    rng = random.Random(name)
    splits = [[n] * (len(data) // n) for n in (1, 2, 3, 5, 8, 64, 300)] if len(data) < 5000 else []
    splits += [[rng.randrange(1, 400) for _ in range(len(data) // 200)] for _ in range(5)]
    for sizes in splits:
        assert _verdict(data, sizes) == whole, sizes[:5]


def test_the_pdf_check_is_bounded():
    # A decompression bomb in an object stream: refused, without inflating it all.
    bomb = zlib.compressobj(9)
    data = bomb.compress(b"1 0\n<<>>\n") + b"".join(bomb.compress(b" " * MIB) for _ in range(100)) + bomb.flush()
    doc = pdf_doc(b"", (pdf_stream(b"/Type/ObjStm/N 1/First 4/Filter/FlateDecode", data),))
    start = time.monotonic()
    problem = _verdict(doc, [])
    assert problem is not None and problem[0] == "PDF_UNCHECKABLE"
    assert time.monotonic() - start < 5
    # Not a PDF: not checked for PDF markers at all.
    assert _verdict(b"hello /JavaScript\n", []) is None
