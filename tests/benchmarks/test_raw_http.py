"""``benchmarks/raw_http.py``: the benchmark's minimal HTTP/1.1 client against a loopback server that
answers by hand (status, Content-Length body, keep-alive, ``Connection: close``, no length)."""

from __future__ import annotations

import asyncio

import pytest
from raw_http import RawClient


async def _serve(handler_log: list) -> asyncio.AbstractServer:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler_log.append("connection")
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            lines = head.split(b"\r\n")
            method, path, _ = lines[0].split(b" ")
            length = next((int(v) for k, _, v in (x.partition(b":") for x in lines[1:]) if k.lower() == b"content-length"), 0)
            body = await reader.readexactly(length)
            handler_log.append((method, path, body))
            if path == b"/nolength":
                writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
            elif path == b"/close":
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                await writer.drain()
                writer.close()
                return
            else:
                reply = b'{"echo": %d}' % len(body)
                writer.write(b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: %d\r\n\r\n%s" % (len(reply), reply))
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_requests_reuse_one_connection_and_read_status_and_body():
    async def main() -> tuple[list, list]:
        log: list = []
        server = await _serve(log)
        port = server.sockets[0].getsockname()[1]
        client = RawClient(f"http://127.0.0.1:{port}", limit=4)
        out = [await client.request("POST", "/v1/score", b'{"texts": ["a"]}'),
               await client.request("GET", "/healthz"),
               await client.request("GET", "/close"),
               await client.request("GET", "/healthz")]
        with pytest.raises(RuntimeError, match="Content-Length"):
            await client.request("GET", "/nolength")
        await client.close()
        server.close()
        await server.wait_closed()
        return out, log

    out, log = asyncio.run(main())
    assert out == [(429, b'{"echo": 16}'), (429, b'{"echo": 0}'), (200, b"ok"), (429, b'{"echo": 0}')]
    # keep-alive: one connection for the first three, a new one after "Connection: close"
    assert log.count("connection") == 2
    assert log[1] == (b"POST", b"/v1/score", b'{"texts": ["a"]}')


def test_an_idle_connection_the_server_closed_or_would_close_is_not_reused(monkeypatch):
    import raw_http

    async def main() -> tuple[list, list]:
        log: list = []
        writers: list = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            log.append("connection")
            writers.append(writer)
            while True:
                try:
                    await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    break
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        client = RawClient(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", limit=4)
        out = [await client.request("GET", "/a")]
        writers[-1].close()  # the server's keep-alive timeout closes the idle connection
        await asyncio.sleep(0.05)
        out.append(await client.request("GET", "/b"))  # a new connection, not an empty answer
        clock = [raw_http.time.monotonic()]
        monkeypatch.setattr(raw_http.time, "monotonic", lambda: clock[0])
        out.append(await client.request("GET", "/c"))  # reused: idle for no time
        clock[0] += raw_http.IDLE_S  # idle as long as a server may keep it: not reused
        out.append(await client.request("GET", "/d"))
        await client.close()
        server.close()
        await server.wait_closed()
        return out, log

    out, log = asyncio.run(main())
    assert out == [(200, b"ok")] * 4 and log.count("connection") == 3
