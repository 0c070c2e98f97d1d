"""The fast path of an upload chunk keeps every guarantee of the slow one.

The PDF check reads stream data in place (no copy of the chunk) and finds markers across chunk
boundaries exactly as a single pass over the file does; the stored received count is written in the
background and completing writes the last one; a chunk written while the previous one is still being
scanned changes neither the hash nor the verdict."""

from __future__ import annotations

import asyncio
import random

import grpc
import pytest
from files import MIB, Uploader, error_info, sha
from harness import expect_error
from sqlmodel import Session, select
from test_attachments import uploaders

from queuechat.domain import attachments
from queuechat.store import blobs
from queuechat.store.blobs import PdfCheck, Scanner
from queuechat.store.models import Attachment

# Markers a PDF may hide in stream data, cut anywhere by chunk boundaries.
MARKS = [
    b"/S /JavaScript ", b"/S\n/Launch>>", b"/J#61vaScript ", b"/#41A ", b"endstream",
    b"endstream\nendobj\n<</AA 1 0 R>>\nstream\n", b"endstream\nendobj\n(/JS)", b"/AA ", b"(", b"%",
]  # fmt: skip


def stream_pdf(rng: random.Random, size: int) -> bytes:
    body = bytearray(rng.randbytes(size))
    for _ in range(rng.randrange(0, 4)):
        mark = rng.choice(MARKS)
        at = rng.randrange(len(body))
        body[at : at + len(mark)] = mark
    end = rng.choice([b"\nendstream\nendobj\n", b"", b"\nendstream\nendobj\n<</OpenAction 3 0 R>>\n"])
    return b"%PDF-1.4\n1 0 obj\n<< /Subtype /Image /Length 9 >>\nstream\n" + bytes(body) + end + b"%%EOF\n"


def text(size: int) -> bytes:
    return b"".join(b"line %08d of a log\n" % i for i in range(size // 20 + 1))[:size]


def verdict(data: bytes, sizes: list[int]) -> object:
    check = PdfCheck()
    at = 0
    for n in sizes:
        check.feed(data[at : at + n])
        at += n
    check.feed(data[at:])
    return check.finish()


@pytest.mark.parametrize("seed", range(40))
def test_stream_data_read_in_place_gives_the_verdict_of_one_pass(seed):
    rng = random.Random(seed)
    data = stream_pdf(rng, rng.choice([2_000, 30_000, 300_000]))
    whole = verdict(data, [])  # one piece: the general path throughout
    for _ in range(4):
        sizes = [rng.choice([1, 9, 65, 319, 320, 321, 4096, 70_000]) for _ in range(rng.randrange(1, 40))]
        assert verdict(data, sizes) == whole, sizes[:8]


def test_markers_right_at_chunk_boundaries():
    rng = random.Random(7)
    filler = bytes(b if b not in b"/#%()<>endstram" else 0x41 for b in rng.randbytes(5000))
    head = b"%PDF-1.4\n1 0 obj\n<< /Length 9 >>\nstream\n"
    for mark, expected in [(b"/S /JavaScript ", "/JavaScript"), (b"/J#61vaScript ", "/JavaScript"), (b"endstream", None)]:
        for cut in range(len(mark) + 1):
            data = head + filler + mark + filler + b"\nendstream\nendobj\n%%EOF\n"
            split = len(head) + len(filler) + cut
            got = verdict(data, [split, 1000, 1000])
            assert (got[1] if got else None) == expected, (mark, cut)


@pytest.mark.parametrize("seed", range(20))
def test_the_search_for_endstream_without_the_gil_finds_what_in_finds(seed):
    rng = random.Random(seed)
    data = bytearray(rng.randbytes(rng.choice([100, 5000, 70_000, 300_000])))
    needle = rng.choice([b"endstream", b"e", b"endstrea", b"ndstream"])
    if rng.random() < 0.7:
        at = rng.choice([0, len(data) - len(needle), rng.randrange(len(data))])
        data[at : at + len(needle)] = needle
        if rng.random() < 0.5:  # only a cut-off copy: not there
            data[at + len(needle) - 1] ^= 0xFF
    for piece in (bytes(data), data):
        assert blobs._contains(piece, needle) == (needle in bytes(data))


@pytest.mark.parametrize("seed", range(30))
def test_the_verdict_is_the_same_with_and_without_libc_memmem(seed, monkeypatch):
    rng = random.Random(1000 + seed)
    data = stream_pdf(rng, rng.choice([30_000, 300_000, 1_200_000]))
    sizes = [rng.choice([4096, 4097, 70_000, 2**20]) for _ in range(rng.randrange(1, 6))]
    fast = verdict(data, sizes)
    monkeypatch.setattr(blobs, "_MEMMEM", None)
    assert verdict(data, sizes) == fast == verdict(data, [])


def test_ascii_text_is_utf8_without_decoding_and_a_split_character_still_counts():
    text = "naïve café ".encode() * 1000
    scanner = Scanner()
    cut = text.index("é".encode()) + 1  # between the two bytes of é
    scanner.update(text[:cut])
    scanner.update(text[cut:])
    assert scanner.result().utf8
    ascii_then_nul = Scanner()
    ascii_then_nul.update(b"plain ascii " * 100)
    ascii_then_nul.update(b"a\x00b")
    assert not ascii_then_nul.result().utf8


async def test_a_completed_upload_stores_its_full_count(server, monkeypatch):
    monkeypatch.setattr(attachments, "_RECORD_EVERY", MIB)  # a record in the background every chunk
    agent, cust = await server.chat(variables={"name": "Ada"})
    _, c_up = uploaders(agent, cust)
    data = text(3 * MIB + 5)
    up = await c_up.create("data.txt", len(data), "text/plain")
    for off in range(0, len(data), MIB):
        got = await c_up.chunk(up.upload_id, off, data[off : off + MIB])
        # Live: a status read right after the chunk sees it, whatever the database has yet.
        assert (await c_up.get(up.upload_id)).received_bytes == got == min(len(data), off + MIB)
    done = await c_up.complete(up.upload_id, sha(data))
    assert done.received_bytes == len(data)
    with Session(server.core.db.engine) as s:
        row = s.exec(select(Attachment).where(Attachment.id == up.upload_id)).one()
        assert (row.received_bytes, row.status) == (len(data), "complete")


async def test_each_boundary_count_is_written_once_even_while_the_last_write_is_in_flight(server, monkeypatch):
    """The stored count is written at each _RECORD_EVERY boundary, once: a chunk that comes while the
    boundary's write is still on the writer does not write its own count again (it did: 17 writes for
    five 20 MiB uploads instead of 10)."""
    import functools
    import time

    monkeypatch.setattr(attachments, "_RECORD_EVERY", 2 * MIB)
    written: list[int] = []
    real = attachments._record_chunk

    @functools.wraps(real)
    def slow_record(tx, upload_id, stored, received):
        written.append(received)
        time.sleep(0.2)  # still in flight when the next chunks come
        return real(tx, upload_id, stored, received)

    monkeypatch.setattr(attachments, "_record_chunk", slow_record)
    agent, cust = await server.chat(variables={"name": "Ada"})
    _, c_up = uploaders(agent, cust)
    data = text(8 * MIB)
    up = await c_up.create("data.txt", len(data), "text/plain")
    for off in range(0, len(data), MIB):
        await c_up.chunk(up.upload_id, off, data[off : off + MIB])
    done = await c_up.complete(up.upload_id, sha(data))
    assert done.received_bytes == len(data)
    assert written == [2 * MIB, 4 * MIB, 6 * MIB]  # 8 MiB is the whole file: completing writes it


async def test_an_upload_deleted_behind_the_nodes_back_is_not_written_to_again(server, monkeypatch):
    monkeypatch.setattr(attachments, "_RECORD_EVERY", MIB)
    agent, cust = await server.chat(variables={"name": "Ada"})
    _, c_up = uploaders(agent, cust)
    data = text(4 * MIB)
    up = await c_up.create("data.txt", len(data), "text/plain")
    await c_up.chunk(up.upload_id, 0, data[:MIB])
    await c_up.chunk(up.upload_id, MIB, data[MIB : 2 * MIB])  # records 2 MiB in the background
    # Another node's sweep, say: the row goes while this node still has the upload in memory.
    with Session(server.core.db.engine) as s:
        s.delete(s.get(Attachment, up.upload_id))
        s.commit()
    # The record in the background finds the row gone (the one for 2 MiB, if it had not run yet, or
    # the next); the chunk after a failed record asks the database.
    with pytest.raises(grpc.aio.AioRpcError) as first:
        await c_up.chunk(up.upload_id, 2 * MIB, data[2 * MIB : 3 * MIB])
        await asyncio.sleep(0.3)
        await c_up.chunk(up.upload_id, 3 * MIB, data[3 * MIB :])
    assert error_info(first.value)[0] == "UPLOAD_NOT_FOUND"
    await expect_error(c_up.get(up.upload_id), first.value.code(), "UPLOAD_NOT_FOUND")


async def test_completing_on_a_restarted_server_trusts_the_bytes_stored(server):
    agent, cust = await server.chat(variables={"name": "Ada"})
    data = text(2 * MIB + 77)
    c_up = Uploader(cust.stub, cust.md, cust.id, customer=True)
    up = await c_up.create("data.txt", len(data), "text/plain")
    await c_up.send_chunks(up.upload_id, data)  # the last chunk writes no count: completing does
    await server.restart()
    c_up = Uploader(server.customer_stub, cust.md, cust.id, customer=True)
    assert (await c_up.get(up.upload_id)).received_bytes == len(data)
    att = (await c_up.complete(up.upload_id, sha(data))).attachment
    assert att.sha256 == sha(data)
