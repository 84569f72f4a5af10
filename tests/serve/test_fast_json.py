"""The scoring routes' JSON fast path (JSONRoutes) and the disconnect watch, at the ASGI level: which
requests it takes, what it answers, and how a client leaving cancels the work."""

from __future__ import annotations

import asyncio
import json

import pytest

from fastgen.serve.app import ClientGone, until_disconnected
from fastgen.serve.fast_json import JSONRoutes, read_body
from fastgen.serve.schemas import ScoreBody


def scope(path="/v1/score", method="POST", content_type=b"application/json", root_path="") -> dict:
    headers = [(b"host", b"x")] + ([(b"content-type", content_type)] if content_type else [])
    return {"type": "http", "method": method, "path": path, "headers": headers, "root_path": root_path}


def chunks(*parts: bytes):
    """An ASGI receive giving the body in ``parts``, then waiting (as a server does until the client leaves)."""
    messages = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()
    return receive


async def call(app, sc, receive) -> tuple[int, dict | None, list[str]]:
    sent = []

    async def send(message):
        sent.append(message)
    await app(sc, receive, send)
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body) if body else None, [k.decode() for k, _ in sent[0]["headers"]]


class Inner:
    """The app behind: records what reached it."""

    def __init__(self):
        self.calls = []

    async def __call__(self, sc, receive, send):
        self.calls.append((sc.get("method"), sc["path"]))
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})


def make():
    from starlette.responses import JSONResponse

    seen = []

    async def handler(data, receive):
        body = ScoreBody.model_validate_json(data)
        seen.append(body.texts)
        return JSONResponse({"n": len(body.texts or [])})
    inner = Inner()
    route = object()
    return JSONRoutes(inner, handlers={"/v1/score": handler}, routes={"/v1/score": route}), inner, seen, route


def test_json_posts_go_to_the_handler_with_the_whole_body():
    app, inner, seen, route = make()
    sc = scope()
    status, body, headers = asyncio.run(call(app, sc, chunks(b'{"texts": ["a", ', b'"b"]}')))
    assert (status, body, seen, inner.calls) == (200, {"n": 2}, [["a", "b"]], [])
    assert "content-length" in headers and sc["route"] is route  # the metrics' label: the FastAPI route's path


@pytest.mark.parametrize("sc", [scope(content_type=b"multipart/form-data; boundary=x"), scope(method="GET"),
                                scope(content_type=b"text/plain"), scope(content_type=b"application/x-www-form-urlencoded"),
                                scope(path="/v1/images/generations"), {"type": "websocket", "path": "/v1/score"}],
                         ids=["multipart", "get", "text", "form", "other-path", "websocket"])
def test_everything_else_goes_on_to_the_app(sc):
    app, inner, seen, _ = make()
    status, _, _ = asyncio.run(call(app, sc, chunks(b"")))
    assert status == 204 and inner.calls == [(sc.get("method"), sc["path"])] and not seen


@pytest.mark.parametrize("content_type", [None, b"application/json; charset=utf-8", b"Application/JSON",
                                          b"application/vnd.api+json"])
def test_json_as_fastapi_reads_it(content_type):  # no content type, or a JSON one
    app, inner, seen, _ = make()
    assert asyncio.run(call(app, scope(content_type=content_type), chunks(b'{"texts": ["x"]}')))[0] == 200 and seen


def test_under_a_route_prefix():  # Ray Serve's --route-prefix: path keeps the prefix, root_path names it
    app, inner, seen, route = make()
    sc = scope(path="/x/v1/score", root_path="/x")
    assert asyncio.run(call(app, sc, chunks(b'{"texts": ["x"]}')))[0] == 200 and seen and sc["route"] is route


@pytest.mark.parametrize(("data", "param", "message"), [
    (b'{"texts": "one"}', "texts", "invalid texts"), (b'{"txts": ["a"]}', "txts", "invalid txts: unknown field"),
    (b"{not json", None, "invalid request body"), (b"", None, "invalid request body")])
def test_a_body_that_does_not_validate_is_400_naming_the_field(data, param, message):
    app, _, seen, _ = make()
    status, body, _ = asyncio.run(call(app, scope(), chunks(data)))
    assert status == 400 and not seen
    assert body["error"]["param"] == param and body["error"]["message"].startswith(message), body


def test_read_body_stops_at_a_disconnect():
    messages = [{"type": "http.request", "body": b"ab", "more_body": True}, {"type": "http.disconnect"}]

    async def receive():
        return messages.pop(0)
    assert asyncio.run(read_body(receive)) == b"ab"


# --- until_disconnected --------------------------------------------------------------------------------

def test_the_work_s_result_when_the_client_stays():
    async def main():
        gone = asyncio.Event()

        async def receive():
            await gone.wait()
            return {"type": "http.disconnect"}
        out = await until_disconnected(receive, asyncio.sleep(0.01, result=7))
        await asyncio.sleep(0)
        return out, [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    out, left = asyncio.run(main())
    assert out == 7 and not left  # the watcher is gone with the request


def test_a_client_leaving_cancels_the_work_and_raises_client_gone():
    async def main():
        cleaned = []

        async def receive():
            await asyncio.sleep(0.02)
            return {"type": "http.disconnect"}

        async def work():
            try:
                await asyncio.sleep(30)
            finally:
                cleaned.append(True)
        with pytest.raises(ClientGone):
            await until_disconnected(receive, work())
        # The task goes on normally: its cancellation was taken back (structured concurrency still works).
        assert getattr(asyncio.current_task(), "cancelling", lambda: 0)() == 0
        await asyncio.sleep(0)
        return cleaned
    assert asyncio.run(main()) == [True]


def test_a_server_that_keeps_answering_with_empty_bodies_is_polled():
    async def main():
        messages = [{"type": "http.request", "body": b"", "more_body": False}] * 2 + [{"type": "http.disconnect"}]

        async def receive():
            return messages.pop(0)
        with pytest.raises(ClientGone):
            await until_disconnected(receive, asyncio.sleep(30))
    asyncio.run(main())


def test_a_cancellation_from_outside_is_not_the_client_s():
    async def main():
        async def receive():
            await asyncio.Event().wait()

        task = asyncio.ensure_future(until_disconnected(receive, asyncio.sleep(30)))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert asyncio.run(main()) == []


def test_a_receive_that_fails_counts_as_the_client_gone():
    async def main():
        async def receive():
            await asyncio.sleep(0.01)
            raise RuntimeError("the proxy lost the connection")
        with pytest.raises(ClientGone):
            await until_disconnected(receive, asyncio.sleep(30))
    asyncio.run(main())


@pytest.mark.skipif(not hasattr(asyncio.Task, "uncancel"), reason="Python < 3.11 does not count cancellations")
def test_an_outside_cancellation_in_the_same_turn_as_the_disconnect_stays_a_cancellation():
    async def main():
        arrived = asyncio.Event()

        async def receive():
            await arrived.wait()
            return {"type": "http.disconnect"}

        task = asyncio.ensure_future(until_disconnected(receive, asyncio.sleep(30)))
        await asyncio.sleep(0.01)
        arrived.set()  # the watcher cancels the task in the next turn; the server cancels it too
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(main())
