"""A minimal HTTP/1.1 client for ``bench_http.py --client raw``: keep-alive connections over asyncio
streams, one request per connection at a time, ``Content-Length`` bodies only (what ``fastgen serve``
answers outside server-sent events). It does what wrk or h2load do for a server benchmark: next to
nothing per request, so that on a 2-core machine the client takes as little as possible of the CPU the
server is measured on. aiohttp and httpx parse headers into objects, manage cookies, pools and timeouts:
0.5 to 2 ms of CPU per request here.
"""

from __future__ import annotations

import asyncio
import socket
import time
from urllib.parse import urlsplit

#: Seconds an idle connection is kept for reuse: under uvicorn's keep-alive timeout (5 s by default), so
#: a request is never sent on a connection the server is closing (it would read an empty answer).
IDLE_S = 4.0


class RawClient:
    """``await client.request(method, path, body) -> (status, body)``; ``await client.close()``."""

    def __init__(self, url: str, limit: int) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []  # (..., since)
        self.slots = asyncio.Semaphore(limit)

    async def _connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection(self.host, self.port)
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return reader, writer

    async def request(self, method: str, path: str, body: bytes | None = None,
                      content_type: str = "application/json") -> tuple[int, bytes]:
        async with self.slots:
            reader, writer = self._reusable() or await self._connect()
            try:
                head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                if body is not None:
                    head += f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n"
                writer.write(head.encode("latin-1") + b"\r\n" + (body or b""))
                lines = (await reader.readuntil(b"\r\n\r\n")).split(b"\r\n")
                status = int(lines[0].split(b" ", 2)[1])
                headers = dict(line.split(b":", 1) for line in lines[1:] if b":" in line)
                headers = {k.strip().lower(): v.strip() for k, v in headers.items()}
                if b"content-length" not in headers:
                    raise RuntimeError(f"{path}: a response without Content-Length (this client reads no other)")
                data = await reader.readexactly(int(headers[b"content-length"]))
            except BaseException:  # cancelled or broken mid-request: the connection's state is unknown
                writer.close()
                raise
            if headers.get(b"connection", b"").lower() == b"close":
                writer.close()
            else:
                self.idle.append((reader, writer, time.monotonic()))
            return status, data

    def _reusable(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        """The most recently used idle connection that the server has not closed and will not close
        before it answers (idle under IDLE_S); the others are closed."""
        now = time.monotonic()
        while self.idle:
            reader, writer, since = self.idle.pop()
            if now - since < IDLE_S and not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()
        return None

    async def close(self) -> None:
        while self.idle:
            _, writer, _ = self.idle.pop()
            writer.close()
