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


@pytest.fixture
async def server(tmp_path, config):
    # QC_TEST_STORE=postgresql runs a module's SQLite tests on PostgreSQL instead (a private schema each):
    # for checking a change to a write path on both stores, e.g. `QC_TEST_STORE=postgresql scripts/test
    # tests/test_routing.py`.
    if os.environ.get("QC_TEST_STORE") == "postgresql":
        from pgutil import pg_schema

        with pg_schema() as url:
            h = await Harness(tmp_path / "data", config, database_url=url).start()
            try:
                yield h
            finally:
                await h.stop()
        return
    h = await Harness(tmp_path / "data", config).start()
    try:
        yield h
    finally:
        await h.stop()
