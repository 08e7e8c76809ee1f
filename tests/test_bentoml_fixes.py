"""service/bentoml_fixes.py: BentoML's request timeout must not keep a timer (and the request's context, with its
OpenTelemetry span) alive for traffic.timeout seconds after each request (RELIABILITY.md, "Memory")."""

from __future__ import annotations

import asyncio


def _middleware(app, timeout: float):
    from bentoml._internal.server.http.traffic import TimeoutMiddleware

    from service import bentoml_fixes

    assert bentoml_fixes.install(), "the installed BentoML is not one service/bentoml_fixes.py patches"
    assert TimeoutMiddleware.__call__ is bentoml_fixes._timeout_call
    return TimeoutMiddleware(app, timeout=timeout)


async def _call(mw, path: str = "/x") -> list[dict]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    await mw({"type": "http", "method": "GET", "path": path, "headers": []}, receive, send)
    return sent


def _live_timers(loop) -> list:
    return [h for h in loop._scheduled if not h.cancelled() and "_set_timer_out" in repr(h)]


def test_timeout_middleware_leaves_no_timer_per_request():
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def main():
        mw = _middleware(app, timeout=3600)
        for _ in range(200):
            sent = await _call(mw)
            assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
        await asyncio.sleep(0)
        return _live_timers(asyncio.get_running_loop())

    assert asyncio.run(main()) == []  # unpatched BentoML 1.4.39: 200 timers, each due in an hour


def test_timeout_middleware_still_times_out():
    async def slow(scope, receive, send):
        await asyncio.sleep(30)

    async def main():
        sent = await _call(_middleware(slow, timeout=0.05))
        return sent, _live_timers(asyncio.get_running_loop())

    sent, timers = asyncio.run(main())
    assert sent[0]["status"] == 504 and b"0.05 seconds" in sent[1]["body"]
    assert timers == []
