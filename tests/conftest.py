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
    h = await Harness(tmp_path / "data", config).start()
    try:
        yield h
    finally:
        await h.stop()
