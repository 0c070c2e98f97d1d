import contextlib
import os

import pytest

# Every event a test server stores is parsed with its chat.v1 message at write time.
os.environ["QUEUECHAT_CHECK_EVENTS"] = "1"

from harness import Harness, base_config, configure


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "configure(max_chats=..., settings=..., ...): adjust the server configuration before it starts"
    )


@pytest.fixture
def config(request):
    """The server's configuration document; adjust it with @pytest.mark.configure(...)."""
    doc = base_config()
    for marker in request.node.iter_markers("configure"):
        configure(doc, **marker.kwargs)
    return doc


@contextlib.asynccontextmanager
async def running(tmp_path, config, store: str):
    """A test server on SQLite (its data folder) or on a private PostgreSQL schema, stopped afterwards."""
    with contextlib.ExitStack() as stack:
        url = None
        if store == "postgresql":
            from pgutil import pg_schema

            url = stack.enter_context(pg_schema())
        h = await Harness(tmp_path / "data", config, database_url=url).start()
        try:
            yield h
        finally:
            await h.stop()


@pytest.fixture
async def server(tmp_path, config):
    # QC_TEST_STORE=postgresql runs a module's tests on PostgreSQL instead: for checking a change to a
    # write path on both stores, e.g. `QC_TEST_STORE=postgresql scripts/test tests/test_routing.py`.
    async with running(tmp_path, config, os.environ.get("QC_TEST_STORE", "sqlite")) as h:
        yield h


@pytest.fixture(params=["sqlite", "postgresql"])
async def any_db_server(request, tmp_path, config):
    """The same server on each store, for rules that must hold on both."""
    async with running(tmp_path, config, request.param) as h:
        yield h
