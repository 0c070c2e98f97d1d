import pytest

from harness import Harness, base_config


@pytest.fixture
def config():
    """Override per test: config.update(...) before using `server`."""
    return base_config()


@pytest.fixture
async def server(tmp_path, config):
    h = await Harness(tmp_path / "data", config).start()
    try:
        yield h
    finally:
        await h.stop()
