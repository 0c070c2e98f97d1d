"""A TCP proxy between cluster nodes and NATS that can be cut, so a test can take NATS away from the nodes
for a while without stopping the NATS service every other test (and developer) shares.

cut(): every open connection is aborted (both sides) and the listening socket is closed, so reconnects are
refused, as when the NATS server is down. restore(): listening again on the same port.

blackhole(True): connections stay up, but every message a node publishes (PUB/HPUB, read off the NATS
protocol) is dropped on its way to NATS; pings, pongs and subscriptions pass, so nobody notices (no
disconnect, no reconnect) and whatever was published meanwhile is lost for good: NATS's at-most-once at
its plainest. blackhole(False) lets them through again.
"""

from __future__ import annotations

import asyncio
import contextlib


class NatsProxy:
    def __init__(self, target_host: str, target_port: int):
        self.target_host = target_host
        self.target_port = target_port
        self.port = 0
        self.connections = 0  # accepted since start, across cuts
        self.links: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None
        self.dropping = False
        self.dropped = 0  # messages dropped by blackhole()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def up(self) -> bool:
        return self.server is not None

    async def start(self) -> NatsProxy:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.get_running_loop().create_task(self._link(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.server is None:  # accepted just as the cut closed the listener
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        self.links |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, to_nats: bool) -> None:
            buf = b""
            try:
                while data := await src.read(65536):
                    if to_nats:
                        buf += data
                        frames, buf = _frames(buf)
                        kept = [f for f in frames if not (self.dropping and _is_publish(f))]
                        self.dropped += len(frames) - len(kept)
                        data = b"".join(kept)
                    if data:
                        dst.write(data)
                        await dst.drain()
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                dst.close()

        try:
            await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))
        finally:
            self.links -= {writer, up_writer}

    def blackhole(self, on: bool) -> None:
        """Drop every byte (on) or pass them again (off); the connections themselves stay up."""
        self.dropping = on

    async def cut(self) -> None:
        """NATS is gone: open connections die without a goodbye, new ones are refused."""
        server, self.server = self.server, None
        if server is not None:
            server.close()
        for w in list(self.links):
            w.transport.abort()
        self.links.clear()
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5)

    async def restore(self) -> None:
        """NATS is back, on the same address."""
        assert self.server is None, "restore() without a cut()"
        await self.start()

    async def stop(self) -> None:
        await self.cut()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(BaseException):
                await task


def _frames(buf: bytes) -> tuple[list[bytes], bytes]:
    """Whole client-to-server NATS protocol frames at the start of buf, and the rest (an incomplete frame)."""
    frames: list[bytes] = []
    while (end := buf.find(b"\r\n")) >= 0:
        line = buf[:end]
        size = end + 2
        if _is_publish(line):
            size += int(line.split()[-1]) + 2  # PUB subject [reply] n / HPUB subject [reply] h n: payload, CRLF
        if len(buf) < size:
            break
        frames.append(buf[:size])
        buf = buf[size:]
    return frames, buf


def _is_publish(frame: bytes) -> bool:
    return frame[:4].upper() in (b"PUB ", b"HPUB")
