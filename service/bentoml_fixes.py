"""A workaround for a memory leak in BentoML 1.4's request timeout (RELIABILITY.md, "Memory").

``bentoml._internal.server.http.traffic.TimeoutMiddleware`` (always installed: ``traffic.timeout`` must be > 0)
schedules ``loop.call_later(timeout, ...)`` for every request and never cancels the handle. An asyncio timer
handle keeps a copy of the request's ``contextvars`` context, and that context holds the request's
OpenTelemetry span (BentoML's ASGI instrumentation records every span, sampled or not), its attributes and the
metrics middleware's variables: about 5 KiB per request, kept until the timer fires. With cxrgen's
``traffic.timeout`` of 3600 s the worker's RSS grew linearly for an hour under load (76 MiB over 13,600 requests).

``install()`` replaces the middleware's ``__call__`` with the same logic plus ``timer.cancel()`` once the
request is answered (a cancelled handle leaves asyncio's timer heap at the loop's next clean-up). Only for the
BentoML version it was written against: another version is left alone with a warning (check whether the leak is
fixed there, then update or drop this module).
"""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("cxrgen.service")
PATCHED_VERSIONS = ("1.4.",)  # bentoml.__version__ prefixes whose TimeoutMiddleware this replicates


async def _timeout_call(self, scope, receive, send) -> None:
    """BentoML 1.4.39's ``TimeoutMiddleware.__call__``, with the timer cancelled when the request ends."""
    if scope["type"] not in ("http", "websocket"):
        return await self.app(scope, receive, send)
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

    async def _send(message) -> None:
        if not waiter.done():
            waiter.set_result(None)
        await send(message)

    fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)
    try:
        try:
            await waiter
        except asyncio.TimeoutError:
            if fut.cancel():
                from starlette.responses import JSONResponse

                resp = JSONResponse({"error": f"Not able to process the request in {self.timeout} seconds"},
                                    status_code=504)
                await resp(scope, receive, send)
        else:
            timer.cancel()  # answered (first message sent): the timeout no longer applies; free the context now
            await fut  # wait for the future to finish
    finally:
        timer.cancel()


def install() -> bool:
    """Patch BentoML's TimeoutMiddleware (idempotent); False where the installed BentoML is not a known one."""
    import bentoml
    from bentoml._internal.server.http import traffic

    cls = traffic.TimeoutMiddleware
    if cls.__call__ is _timeout_call:
        return True
    if not bentoml.__version__.startswith(PATCHED_VERSIONS) or not hasattr(cls, "_set_timer_out"):
        log.warning("cxrgen: BentoML %s is not a version whose TimeoutMiddleware cxrgen patches (%s): its "
                    "per-request timer leak (service/bentoml_fixes.py) is not worked around", bentoml.__version__,
                    ", ".join(PATCHED_VERSIONS))
        return False
    cls.__call__ = _timeout_call
    return True
