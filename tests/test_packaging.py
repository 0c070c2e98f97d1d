"""The wheel `pip install queuechat` gets, and the entry points' word on a missing extra.

The wheel is built from a copy of the sources (pip builds in the source tree, and leaves build/ there), without
build isolation: the test extra brings setuptools, so no download is needed. scripts/setup makes what the wheel
carries besides the sources: the chat.v1 modules (scripts/gen) and the customer page bundle (scripts/build-web).
"""

import email.parser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PROTOS = sorted(p.stem for p in (ROOT / "proto" / "chat" / "v1").glob("*.proto"))


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    for made, by in [
        (ROOT / "server" / "chat" / "v1" / "resources_pb2.py", "scripts/gen"),
        (ROOT / "clients" / "queuechat_web" / "build" / "app.js", "scripts/build-web"),
    ]:
        if not made.exists():
            pytest.fail(f"{made.relative_to(ROOT)} is missing: scripts/setup runs {by}", pytrace=False)
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "gen")
    for tree in ("server", "clients"):
        shutil.copytree(ROOT / tree, src / tree, ignore=skip)
    out = tmp / "dist"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [built] = out.glob("queuechat-*.whl")
    with zipfile.ZipFile(built) as zf:
        yield zf


def _dist_info(wheel: zipfile.ZipFile, name: str) -> str:
    [path] = [n for n in wheel.namelist() if n.endswith(f".dist-info/{name}")]
    return wheel.read(path).decode()


def test_the_wheel_holds_the_server_the_generated_code_and_both_clients(wheel):
    names = set(wheel.namelist())
    expected = {
        "queuechat/__main__.py",
        "queuechat/config.py",
        "queuechat/api/server.py",
        "queuechat/domain/core.py",
        "queuechat/store/db.py",
        "chat/__init__.py",
        "chat/v1/__init__.py",
        "queuechat_web/__init__.py",
        "queuechat_web/bridge.py",
        "queuechat_web/page/index.html",
        "queuechat_web/page/app.css",
        # The page bundle the bridge serves (and its gzip twin).
        "queuechat_web/build/app.js",
        "queuechat_web/build/app.js.gz",
        "queuechat_agent/__main__.py",
        "queuechat_agent/cli.py",
        "queuechat_agent/app.py",
    }
    for proto in PROTOS:
        expected |= {f"chat/v1/{proto}_pb2.py", f"chat/v1/{proto}_pb2.pyi", f"chat/v1/{proto}_pb2_grpc.py"}
    # Every module and data file of the sources: a folder without __init__.py, or data that package-data
    # misses (the migrations' template), would be left out silently.
    for tree in ("server", "clients"):
        for f in (ROOT / tree).rglob("*"):
            rel = f.relative_to(ROOT / tree)
            if f.is_file() and "__pycache__" not in rel.parts and "gen" not in rel.parts and f.suffix in (".py", ".mako"):
                expected.add(rel.as_posix())
    assert sorted(expected - names) == []
    assert len(wheel.read("queuechat_web/build/app.js")) > 10_000
    # Not shipped: the tests, and the page's generated TypeScript (only the bundle is served).
    assert not [n for n in names if n.startswith("tests/") or "/build/gen/" in n or "__pycache__" in n]


def test_the_wheel_names_both_commands(wheel):
    scripts = _dist_info(wheel, "entry_points.txt")
    assert "queuechat = queuechat.__main__:main" in scripts
    assert "queuechat-agent = queuechat_agent.__main__:main" in scripts


def test_the_extras_carry_postgres_nats_and_textual(wheel):
    meta = email.parser.Parser().parsestr(_dist_info(wheel, "METADATA"))
    assert {"postgres", "cluster", "agent", "test"} <= set(meta.get_all("Provides-Extra"))
    requires = meta.get_all("Requires-Dist")
    base = {r.split(";")[0].split(">")[0].split("[")[0].strip().lower() for r in requires if "extra ==" not in r}
    assert {"grpcio", "grpcio-health-checking", "grpcio-reflection", "sqlmodel", "pydantic", "aiohttp"} <= base
    assert not base & {"psycopg", "nats-py", "textual"}

    def extra(name: str) -> list[str]:
        return [r.split(";")[0].strip() for r in requires if r.endswith(f'extra == "{name}"')]

    assert [r for r in extra("postgres") if r.startswith("psycopg[binary]")]
    assert [r for r in extra("cluster") if r.startswith("nats-py")]
    assert [r for r in extra("agent") if r.startswith("textual")]
    # The test extra is everything: every other extra as well.
    [itself] = [r for r in extra("test") if r.startswith("queuechat[")]
    assert set(itself.removeprefix("queuechat[").partition("]")[0].split(",")) == set(meta.get_all("Provides-Extra")) - {"test"}


def _without(module: str, code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter where importing `module` fails as if it were not installed."""
    prelude = f"import sys; sys.modules[{module!r}] = None\n"
    return subprocess.run(
        [sys.executable, "-c", prelude + code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def test_serve_on_postgresql_without_the_driver_names_the_extra():
    result = _without(
        "psycopg",
        "from queuechat.__main__ import main\n"
        "sys.exit(main(['serve', '--config', 'config/demo.toml', '--web-listen', '',"
        " '--database-url', 'postgresql+psycopg://nobody@127.0.0.1:1/nothing']))",
    )
    assert result.returncode == 2, result.stderr
    assert "queuechat: PostgreSQL needs the postgres extra: pip install 'queuechat[postgres]'" in result.stderr


def test_the_agent_desktop_without_textual_names_the_extra():
    result = _without("textual", "from queuechat_agent.__main__ import main\nsys.exit(main(['ui']))")
    assert result.returncode == 2, result.stderr
    assert "queuechat-agent: the desktop needs the agent extra: pip install 'queuechat[agent]'" in result.stderr
    # The scriptable mode needs no textual.
    result = _without("textual", "from queuechat_agent.__main__ import main\nsys.exit(main(['--help']))")
    assert result.returncode == 0, result.stderr


def _healthcheck_command() -> list[str]:
    """The Dockerfile's HEALTHCHECK ... CMD ["python", "-c", ...] (continuation lines joined)."""
    import json
    import re

    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    found = re.search(r"^HEALTHCHECK .*? CMD (\[.*\])$", text, re.MULTILINE)
    assert found, "the Dockerfile has no HEALTHCHECK with an exec-form CMD"
    command = json.loads(found[1])
    assert command[0] == "python"
    return [sys.executable, *command[1:]]


async def test_the_images_health_check_asks_grpc_health(server):
    """The image's health check, run here: 0 while the server serves, 1 when nothing answers on the port."""
    import asyncio
    import os
    import socket

    command = _healthcheck_command()

    def check(port: int) -> subprocess.CompletedProcess[str]:
        env = dict(os.environ, QUEUECHAT_LISTEN=f"[::]:{port}")
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)

    up = await asyncio.to_thread(check, server.port)
    assert up.returncode == 0, up.stderr
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    down = await asyncio.to_thread(check, free)
    assert down.returncode == 1


def test_serve_runs_on_uvloop_and_on_asyncios_loop_when_told():
    import asyncio

    import uvloop

    from queuechat import eventloop

    assert eventloop.factory({}) is uvloop.new_event_loop
    assert eventloop.factory({"QUEUECHAT_EVENT_LOOP": "asyncio"}) is None
    with pytest.raises(ValueError, match="one of uvloop, asyncio, not 'bogus'"):
        eventloop.factory({"QUEUECHAT_EVENT_LOOP": "bogus"})

    async def which() -> str:
        return eventloop.name(asyncio.get_running_loop())

    assert eventloop.run(which()) == "uvloop"
    # Where uvloop is not installed (Windows), asyncio's own loop.
    result = _without("uvloop", "from queuechat import eventloop\nprint(eventloop.factory())")
    assert result.stdout.strip() == "None", result.stderr


def test_serve_refuses_an_unknown_event_loop_before_touching_anything(tmp_path, capsys, monkeypatch):
    from queuechat.__main__ import main

    monkeypatch.setenv("QUEUECHAT_EVENT_LOOP", "trio")
    assert main(["serve", "--config", str(ROOT / "config" / "demo.toml"), "--data-dir", str(tmp_path)]) == 2
    assert "queuechat: QUEUECHAT_EVENT_LOOP must be one of uvloop, asyncio, not 'trio'" in capsys.readouterr().err
    assert not (tmp_path / "queuechat.db").exists()
