"""A minimal HTTP/1.1 keep-alive client, for every request the bench times.

Raw asyncio streams: the client shares two cores with the proxy and the simulator, so it must
cost as little as possible and the same for both proxies.
"""

from __future__ import annotations

import asyncio


class HttpError(Exception):
    pass


class Conn:
    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def _open(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(
            "127.0.0.1", self.port, limit=1 << 20)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None

    def head(self, path: str, length: int, extra: str = "") -> bytes:
        return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {length}\r\n"
                f"User-Agent: affinity-bench\r\n{extra}\r\n").encode()

    async def post(self, path: str, body: bytes) -> tuple[int, int]:
        """(status, response body bytes). Reconnects when the server closed the connection."""
        for attempt in (0, 1):
            if self.writer is None:
                await self._open()
            assert self.reader is not None and self.writer is not None
            try:
                self.writer.write(self.head(path, len(body)) + body)
                await self.writer.drain()
                return await self._response()
            except (ConnectionError, asyncio.IncompleteReadError) as e:
                self.close()
                if attempt:
                    raise HttpError(f"port {self.port}: {type(e).__name__}") from None
        raise AssertionError("unreachable")

    async def _response(self) -> tuple[int, int]:
        assert self.reader is not None
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            k, sep, v = line.partition(":")
            if sep:
                headers[k.strip().lower()] = v.strip()
        n = 0
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size = int((await self.reader.readline()).split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while (await self.reader.readline()) not in (b"\r\n", b""):
                        pass
                    break
                n += len(await self.reader.readexactly(size + 2)) - 2
        elif "content-length" in headers:
            n = len(await self.reader.readexactly(int(headers["content-length"])))
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, n


async def sim_reset(sim_port: int) -> None:
    # The simulator records every request with its body: forget them now and then, or a long
    # run would grow the simulator to gigabytes and slow both proxies' upstream alike.
    c = Conn(sim_port)
    try:
        await c.post("/_sim/reset", b"")
    finally:
        c.close()
