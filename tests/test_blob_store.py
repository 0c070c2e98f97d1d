"""The blob stores: one behaviour contract for files on disk and chunk rows in PostgreSQL, then what
only the database store promises: any node continues, finishes and serves any upload, and two nodes
committing or removing the same bytes at once never lose or corrupt them."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import threading
from collections.abc import Iterator
from datetime import timedelta

import grpc
import pytest
from files import MIB, Uploader, pdf_doc, sha
from harness import Harness, base_config
from pgutil import pg_url  # noqa: F401  (fixture)
from sqlalchemy import text
from sqlmodel import Session, select

from queuechat.store import migrations
from queuechat.store.blobs import Blobs, BlobStore, DbBlobStore, Scanner, blob_store_for
from queuechat.store.models import Attachment


@pytest.fixture
def db_url(pg_url: str) -> str:  # noqa: F811
    migrations.ensure(pg_url)
    return pg_url


@pytest.fixture(params=["files", "postgresql"])
def store(request, tmp_path) -> Iterator[Blobs]:
    if request.param == "files":
        s: Blobs = BlobStore(tmp_path / "files")
    else:
        s = DbBlobStore(request.getfixturevalue("db_url"))
    try:
        yield s
    finally:
        s.close()


@pytest.fixture
def two_nodes(db_url: str) -> Iterator[tuple[DbBlobStore, DbBlobStore]]:
    """Two stores on one database, each with its engine: two nodes of a cluster."""
    a, b = DbBlobStore(db_url), DbBlobStore(db_url)
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def put(store: Blobs, upload_id: str, data: bytes, step: int, start: int = 0) -> None:
    for off in range(start, len(data), step):
        store.write_chunk(upload_id, off, data[off : off + step])


def at_once(*calls: tuple) -> list[BaseException]:
    """Run each (fn, *args) on a thread of its own, all released together; what they raised."""
    start = threading.Barrier(len(calls))
    errors: list[BaseException] = []

    def run(fn, *args) -> None:
        start.wait()
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 - reported to the test
            errors.append(e)

    threads = [threading.Thread(target=run, args=call) for call in calls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors


def expected_scan(data: bytes):
    scanner = Scanner()
    scanner.update(data)
    return scanner.result()


DATA = os.urandom(3 * MIB + 12345)


# --- the contract, for both stores ----------------------------------------------------------


def test_chunks_resume_and_scan(store: Blobs):
    assert store.part_size("u1") == 0
    put(store, "u1", DATA[: 2 * MIB], MIB)
    assert store.part_size("u1") == 2 * MIB
    # A chunk sent again where it is already stored (a retry, a resume elsewhere) changes nothing.
    store.write_chunk("u1", MIB, DATA[MIB : 2 * MIB])
    assert store.part_size("u1") == 2 * MIB
    put(store, "u1", DATA, MIB, start=2 * MIB)
    assert store.part_size("u1") == len(DATA)
    assert store.scan("u1") == expected_scan(DATA)


def test_a_write_cuts_what_lies_beyond(store: Blobs):
    put(store, "u1", DATA[: 3 * MIB], MIB)
    # Resumed from a lower bound, in the middle of a stored chunk and with another chunk size.
    cut = MIB + 1000
    store.write_chunk("u1", cut, DATA[cut : cut + 500])
    assert store.part_size("u1") == cut + 500
    put(store, "u1", DATA, 777_777, start=cut + 500)
    assert store.part_size("u1") == len(DATA)
    assert store.scan("u1").sha256 == sha(DATA)
    # From the start again.
    store.write_chunk("u1", 0, b"new")
    assert store.part_size("u1") == 3
    assert store.scan("u1").sha256 == sha(b"new")


def test_scan_checks_pdfs_as_the_running_scanner_does(store: Blobs):
    doc = pdf_doc(b"/OpenAction<</S/JavaScript/JS(app.alert(1))>>")
    put(store, "u1", doc, 50)
    scan = store.scan("u1")
    assert scan == expected_scan(doc)
    assert scan.pdf_problem is not None and scan.pdf_problem[0] == "PDF_ACTIVE_CONTENT"


def test_commit_and_read_ranges(store: Blobs):
    put(store, "u1", DATA, 300_000)  # chunks that are not aligned with the reads
    digest = sha(DATA)
    store.commit("u1", digest)
    assert store.part_size("u1") == 0
    size = len(DATA)
    ranges = [
        (0, MIB), (MIB, MIB), (10, 100), (299_990, 20), (300_000, 300_000), (5, 2 * MIB),
        (size - 10, 10), (size - 10, MIB), (0, size), (0, 2 * size), (size - 1, 1),
    ]  # fmt: skip
    for offset, n in ranges:
        assert store.read(digest, offset, n) == DATA[offset : offset + n], (offset, n)
    assert store.read(digest, size, MIB) == b""
    assert store.read(digest, size + 5, MIB) == b""
    # A download in steps, as the domain reads it.
    assert b"".join(store.read(digest, off, MIB) for off in range(0, size, MIB)) == DATA


def test_the_same_bytes_share_one_blob(store: Blobs):
    put(store, "u1", DATA, MIB)
    put(store, "u2", DATA, 400_000)  # the same file, chunked otherwise
    digest = sha(DATA)
    store.commit("u1", digest)
    store.commit("u2", digest)
    assert store.part_size("u1") == store.part_size("u2") == 0
    assert store.read(digest, 0, 2 * len(DATA)) == DATA
    assert store.read(digest, MIB - 3, 10) == DATA[MIB - 3 : MIB + 7]
    if isinstance(store, BlobStore):
        assert [p.name for p in store.root.rglob("*") if p.is_file()] == [digest]


def test_remove(store: Blobs):
    put(store, "u1", b"abc" * 1000, 1000)
    put(store, "u2", b"xyz", 3)
    digest = sha(b"xyz")
    store.commit("u2", digest)
    store.remove_part("u1")
    store.remove_part("u1")  # twice: nothing there, no error
    store.remove_part("never")
    assert store.part_size("u1") == 0
    store.remove_blob(digest)
    store.remove_blob(digest)
    with pytest.raises(FileNotFoundError):
        store.read(digest, 0, 10)
    with pytest.raises(FileNotFoundError):
        store.read(sha(b"never"), 0, 10)


# --- which store for which database ---------------------------------------------------------


def test_blob_store_for_picks_by_database(tmp_path, db_url):
    files = blob_store_for(f"sqlite:///{tmp_path / 'q.db'}", tmp_path / "files")
    assert isinstance(files, BlobStore) and files.root == tmp_path / "files"
    for database in (db_url, migrations_engine(db_url)):
        store = blob_store_for(database, tmp_path / "files")
        try:
            assert isinstance(store, DbBlobStore)
            if not isinstance(database, str):
                assert store.engine is not database  # a pool of its own, not the writer's
            store.write_chunk("u", 0, b"x")
            assert store.part_size("u") == 1
        finally:
            store.close()
            if not isinstance(database, str):
                database.dispose()


def migrations_engine(url: str):
    from sqlalchemy import create_engine

    return create_engine(url)


# --- two nodes on one database --------------------------------------------------------------


def test_an_upload_begun_on_one_node_is_finished_and_served_by_another(two_nodes):
    a, b = two_nodes
    put(a, "u1", DATA[: 2 * MIB], MIB)
    resumed = b.part_size("u1")
    assert resumed == 2 * MIB
    b.write_chunk("u1", MIB, DATA[MIB : 2 * MIB])  # the last chunk again: the client was not told
    put(b, "u1", DATA, MIB, start=resumed)
    digest = sha(DATA)
    assert b.scan("u1").sha256 == digest
    b.commit("u1", digest)
    assert a.read(digest, 0, len(DATA)) == DATA
    assert b"".join(a.read(digest, off, MIB) for off in range(0, len(DATA), MIB)) == DATA


def test_two_nodes_committing_the_same_bytes_at_once(two_nodes):
    a, b = two_nodes
    for round_ in range(10):
        data = os.urandom(MIB + round_)
        digest = sha(data)
        put(a, f"a{round_}", data, 256 * 1024)
        put(b, f"b{round_}", data, 300_000)
        errors = at_once((a.commit, f"a{round_}", digest), (b.commit, f"b{round_}", digest))
        assert errors == []
        assert a.part_size(f"a{round_}") == b.part_size(f"b{round_}") == 0
        assert a.read(digest, 0, 2 * MIB) == b.read(digest, 0, 2 * MIB) == data


def test_concurrent_removals_and_commits_of_one_blob(two_nodes):
    a, b = two_nodes
    digest = sha(b"hello")
    for round_ in range(20):
        a.write_chunk(f"u{round_}", 0, b"hello")
        errors = at_once((a.commit, f"u{round_}", digest), (b.remove_blob, digest), (a.remove_blob, digest))
        assert errors == []
        # Either removed after the commit (no row names it) or committed after the removals.
        with contextlib.suppress(FileNotFoundError):
            assert a.read(digest, 0, 10) == b"hello"


def test_chunk_rows_are_as_they_arrived(db_url):
    store = DbBlobStore(db_url)
    try:
        put(store, "u1", DATA, MIB)
        with store.engine.connect() as conn:
            rows = conn.execute(
                text('SELECT "offset", octet_length(data) FROM blob_chunk WHERE key = :k ORDER BY "offset"'),
                {"k": "part:u1"},
            ).all()
        assert [tuple(r) for r in rows] == [(o, min(MIB, len(DATA) - o)) for o in range(0, len(DATA), MIB)]
    finally:
        store.close()


# --- through real servers: two nodes on one PostgreSQL database -------------------------------


@pytest.fixture
async def two_servers(tmp_path, pg_url):  # noqa: F811
    """Two servers (two Cores) on one database, sharing no directory."""
    servers = []
    try:
        for name in ("node1", "node2"):
            h = await Harness(tmp_path / name, base_config(), database_url=pg_url).start()
            servers.append(h)
            assert isinstance(h.core.attachments.blobs, DbBlobStore)  # Core picks the store by database
        yield servers
    finally:
        for h in servers:
            await h.stop()


def nothing_on_disk(h: Harness) -> bool:
    root = h.data_dir / "files"
    return not root.exists() or not any(p.is_file() for p in root.rglob("*"))


async def test_upload_on_one_server_resume_and_download_on_another(two_servers):
    h1, h2 = two_servers
    _, cust = await h1.chat(variables={"name": "Ada"})
    data = ("line of text\n" * 300_000).encode()  # 3.9 MB
    up1 = Uploader(h1.customer_stub, cust.md, cust.id, customer=True)
    up = await up1.create("log.txt", len(data), "text/plain")
    await up1.send_chunks(up.upload_id, data[: 2 * MIB])

    # node1 goes away; the client carries on with node2 from what it confirms.
    up2 = Uploader(h2.customer_stub, cust.md, cust.id, customer=True)
    state = await up2.get(up.upload_id)
    assert state.received_bytes == 2 * MIB
    await up2.chunk(up.upload_id, MIB, data[MIB : 2 * MIB])  # a retry of the last chunk
    await up2.send_chunks(up.upload_id, data, start=2 * MIB)
    att = (await up2.complete(up.upload_id, sha(data))).attachment
    assert (att.sha256, att.size_bytes, att.content_type) == (sha(data), len(data), "text/plain")

    # The same bytes again through node1: one blob.
    again = await up1.upload(data, "copy.txt")
    assert again.sha256 == att.sha256

    # Any node serves it, whole or from an offset.
    _, got = await up2.download(att.attachment_id)
    assert got == data
    _, tail = await up1.download(att.attachment_id, offset=MIB + 7)
    assert tail == data[MIB + 7 :]
    await up1.delete(again.attachment_id)
    _, still = await up1.download(att.attachment_id)
    assert still == data
    assert nothing_on_disk(h1) and nothing_on_disk(h2)


async def test_sweeps_on_two_servers_at_once(two_servers):
    h1, h2 = two_servers
    _, cust = await h1.chat(variables={"name": "Ada"})
    up1 = Uploader(h1.customer_stub, cust.md, cust.id, customer=True)
    kept = await up1.upload(b"keep me\n", "keep.txt")
    await up1.upload(b"shared bytes\n", "a.txt")
    await up1.upload(b"shared bytes\n", "b.txt")
    half = await up1.create("half.txt", 100)
    await up1.chunk(half.upload_id, 0, b"x" * 50)

    # All but `kept` have expired: both nodes sweep at once.
    engine = h1.core.db.engine
    with Session(engine) as s:
        for row in s.exec(select(Attachment).where(Attachment.id != kept.attachment_id)).all():
            assert row.expires_at is not None
            row.expires_at = row.expires_at - timedelta(days=1)
            s.add(row)
        s.commit()
    await asyncio.gather(h1.core.attachments.sweep(), h2.core.attachments.sweep())

    with Session(engine) as s:
        assert [r.id for r in s.exec(select(Attachment)).all()] == [kept.attachment_id]
    with engine.connect() as conn:
        keys = conn.execute(text("SELECT DISTINCT key FROM blob_chunk ORDER BY key")).scalars().all()
    assert keys == ["sha:" + sha(b"keep me\n")]


async def test_a_blob_named_by_another_nodes_upload_is_not_removed(two_servers):
    """Node 2 sweeps the last attachment of some bytes just as node 1 deduplicates a new upload onto
    them (commit done, its completing write not yet): the bytes stay."""
    h1, h2 = two_servers
    _, cust = await h1.chat(variables={"name": "Ada"})
    up1 = Uploader(h1.customer_stub, cust.md, cust.id, customer=True)
    data = b"the same bytes\n" * 1000
    digest = sha(data)
    old = await up1.upload(data, "old.txt")
    new = await up1.create("new.txt", len(data))
    await up1.send_chunks(new.upload_id, data)

    store1 = h1.core.attachments.blobs
    store1.commit(new.upload_id, digest)  # node 1: the bytes are there already, its part goes
    with Session(h2.core.db.engine) as s:  # node 2: the old attachment expires and is swept
        row = s.get(Attachment, old.attachment_id)
        assert row is not None
        s.delete(row)
        s.commit()
    h2.core.attachments.blobs.remove_blob(digest)

    att = (await up1.complete(new.upload_id, digest)).attachment  # node 1's completing write
    _, got = await Uploader(h2.customer_stub, cust.md, cust.id, customer=True).download(att.attachment_id)
    assert got == data


def test_part_rows_hash_like_the_file(db_url):
    store = DbBlobStore(db_url)
    try:
        put(store, "u", DATA, 123_456)
        assert store.scan("u").sha256 == hashlib.sha256(DATA).hexdigest()
    finally:
        store.close()


def test_files_of_a_single_server_are_imported(tmp_path, db_url):
    files = BlobStore(tmp_path / "files")
    put(files, "done", DATA, MIB)
    files.commit("done", sha(DATA))
    put(files, "half", DATA[: MIB + 5], MIB)
    store = DbBlobStore(db_url)
    try:
        assert store.import_files(tmp_path / "files") == 2
        assert store.import_files(tmp_path / "files") == 0  # again: nothing to do
        assert store.read(sha(DATA), 0, 2 * len(DATA)) == DATA
        assert store.part_size("half") == MIB + 5
        put(store, "half", DATA, MIB, start=MIB + 5)
        assert store.scan("half").sha256 == sha(DATA)
        assert store.import_files(tmp_path / "nothing") == 0
    finally:
        store.close()


async def test_an_upload_another_server_expires_while_it_completes_leaves_no_bytes(two_servers):
    """Node 2's sweep removes the upload between node 1 moving its bytes in and marking it complete:
    node 1 is told the upload is gone, and no bytes are left behind."""
    h1, h2 = two_servers
    _, cust = await h1.chat(variables={"name": "Ada"})
    up1 = Uploader(h1.customer_stub, cust.md, cust.id, customer=True)
    data = b"late\n" * 100
    up = await up1.create("late.txt", len(data))
    await up1.send_chunks(up.upload_id, data)
    with Session(h1.core.db.engine) as s:
        row = s.get(Attachment, up.upload_id)
        assert row is not None and row.expires_at is not None
        row.expires_at = row.expires_at - timedelta(days=1)
        s.add(row)
        s.commit()
    blobs = h1.core.attachments.blobs
    loop = asyncio.get_running_loop()
    real_commit = blobs.commit

    def commit_then_sweep_elsewhere(upload_id: str, sha256: str) -> None:
        real_commit(upload_id, sha256)
        asyncio.run_coroutine_threadsafe(h2.core.attachments.sweep(), loop).result(10)

    blobs.commit = commit_then_sweep_elsewhere  # type: ignore[method-assign]
    try:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await up1.complete(up.upload_id, sha(data))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        blobs.commit = real_commit  # type: ignore[method-assign]
    with h1.core.db.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM blob_chunk")).scalar_one() == 0
