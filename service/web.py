"""The service's GET routes, as a FastAPI app mounted into the BentoML service (issue 9, section 2).

An ``@bentoml.api`` route answers POST only, so the feedback stream, the models list, job status
and results, stored images and the ``/ui`` page live here. FastAPI rather than bare Starlette because
BentoML merges a mounted FastAPI app's OpenAPI paths into its own ``/docs.json``: clients and the
schemathesis test see every route with its bounded parameters. Every handler is async and does its
database work in a worker thread, so none of them waits behind a running generation.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

from typing import Literal

from fastapi import FastAPI, Query
from fastapi import Path as PathParam
from fastapi.exceptions import RequestValidationError
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse

log = logging.getLogger("cxrgen.service")
STATIC = Path(__file__).resolve().parent / "static"
RUNTIME: dict = {}  # set by the service instance: cfg, store, jobs, engine, metrics
STREAM_PAGE = 200  # events read per query while streaming


def error(status: int, message: str, field: str | None = None) -> JSONResponse:
    body = {"error": message}
    if field:
        body["field"] = field
    return JSONResponse(body, status_code=status)


READY_WAIT_S = 120  # how long a request that arrives during start-up waits for this worker's models
app = FastAPI(title="cxrgen GET routes", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(RequestValidationError)
async def _bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
    """400 naming the parameter (as the POST routes do), without echoing its value."""
    errors = [{"loc": list(e["loc"]), "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    field = str(errors[0]["loc"][-1]) if errors and errors[0]["loc"] else None
    return JSONResponse({"error": errors[0]["msg"] if errors else "invalid request", "field": field,
                         "detail": errors}, status_code=400)


# ------------------------------------------------------------------ feedback

NDJSON = {200: {"content": {"application/x-ndjson": {}}, "description": "one event per line, then a status line"}}


@app.get("/feedback/stream", response_class=StreamingResponse, responses=NDJSON)
async def stream(after: int = Query(0, ge=0, le=2**62, description="cursor: events with seq > after"),
                 images: bool = Query(True, description="generations carry their PNG as base64"),
                 limit: int = Query(0, ge=0, le=10**9, description="at most this many events (0: all)")):
    """Every feedback event after the cursor as NDJSON (the format of `cxrgen feedback export`), read and
    sent a page at a time; the last line is {"kind": "end", "events", "cursor"} (or {"kind": "error"}),
    so a client can tell a complete stream from a cut one and resume from the cursor."""
    from training.feedback.exchange import iter_export

    store = RUNTIME["store"]

    async def lines():
        it = iter_export(store, after, images, page=STREAM_PAGE)
        n, cursor = 0, after
        try:
            while not limit or n < limit:
                item = await asyncio.to_thread(next, it, None)
                if item is None:
                    break
                line, cursor = item
                n += 1
                yield line
        except Exception as e:  # the status line says the stream is incomplete; the client retries
            log.exception("feedback stream failed after %d events", n)
            yield json.dumps({"kind": "error", "error": f"{type(e).__name__}: stream failed after {n} events",
                              "cursor": cursor}) + "\n"
            return
        yield json.dumps({"kind": "end", "events": n, "cursor": cursor}) + "\n"

    return StreamingResponse(lines(), media_type="application/x-ndjson")


@app.get("/feedback/criteria")
async def criteria() -> dict:
    """The criteria a rating can mark as failed, in order."""
    from training.feedback.models import CRITERIA

    return {"criteria": list(CRITERIA)}


def _item(g) -> dict:
    return {"id": g.id, "prompt": g.prompt, "findings": g.findings, "image_url": f"/generations/{g.id}/image.png"}


@app.get("/feedback/queue")
async def queue(rater: str = Query(min_length=1, max_length=255, pattern=r"^[A-Za-z0-9_.@-]+$"),
                mode: Literal["rate", "compare"] = "rate", limit: int = Query(10, ge=1, le=100)) -> dict:
    """What a rater has not rated (mode=rate) or compared (mode=compare) yet: the rating page's work list."""
    store = RUNTIME["store"]
    if mode == "rate":
        gens = await asyncio.to_thread(store.unrated, rater, limit)
        return {"items": [_item(g) for g in gens]}
    pairs = await asyncio.to_thread(store.uncompared_pairs, rater, limit)
    return {"items": [{"prompt": a.prompt, "findings": a.findings, "a": _item(a), "b": _item(b)} for a, b in pairs]}


@app.get("/generations/{gid}/image.png", response_class=Response,
         responses={200: {"content": {"image/png": {}}}, 404: {"description": "no such generation"}})
async def image(gid: int = PathParam(ge=1, le=2**62)):
    """A stored generation's PNG (with its provenance chunks)."""
    from training.feedback.errors import UnknownReference

    try:
        data = await asyncio.to_thread(RUNTIME["store"].image_bytes, gid)
    except (UnknownReference, FileNotFoundError):
        return error(404, f"no generation with id {gid}", "gid")
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


# ------------------------------------------------------------------ models and jobs


@app.get("/models")
async def models():
    """The generator being served (version, source, stage, parent, metrics), the reward models' versions and
    the checkpoints registered in the BentoML model store."""
    engine = RUNTIME["engine"]
    if engine.model is None:
        # Readiness is per worker: a client sent here by a /readyz another worker answered waits for this
        # worker's load (bounded, as /generate does) instead of getting a 503; a failed load answers at once.
        await asyncio.to_thread(engine.ready_event.wait, READY_WAIT_S)
    if engine.model is None:
        return error(503, "models are still loading" if not engine.ready_event.is_set()
                     else "the models failed to load on this server; see its log")
    rewards = await asyncio.to_thread(engine.reward_versions)
    registered = await asyncio.to_thread(_bento_models)
    return {"serving": engine.model.info(), "rewards": rewards, "registered": registered, "ready": engine.ready}


def _bento_models() -> list[dict]:
    from service.engine import registered_models

    return [{"tag": str(m.tag), "version": m.info.metadata.get("version"), "created": str(m.creation_time)}
            for m in registered_models()]


def job_view(job) -> dict:
    rate = round(job.done / job.sampled, 4) if job.sampled else None
    return {"id": job.id, "kind": job.kind, "state": job.state, "total": job.total, "done": job.done,
            "sampled": job.sampled, "acceptance_rate": rate, "progress": round(job.done / max(job.total, 1), 4),
            "error": job.error, "result_url": f"/augment/{job.id}/result" if job.state == "done" else None,
            "created": job.created, "updated": job.updated, "spec": job.spec}


JobId = PathParam(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")


@app.get("/augment/{job}")
async def job_status(job: str = JobId):
    """An augmentation batch: state (queued, running, done, failed), progress, acceptance rate, error."""
    rec = await asyncio.to_thread(RUNTIME["jobs"].get, job)
    if rec is None:
        return error(404, f"no job {job!r}", "job")
    return job_view(rec)


@app.get("/augment/{job}/result", response_class=FileResponse,
         responses={200: {"content": {"application/gzip": {}}}, 409: {"description": "not done"}})
async def job_result(job: str = JobId):
    """The finished batch as .tar.gz: MIMIC-CXR-JPG layout, reports, label tables, manifest.json."""
    rec = await asyncio.to_thread(RUNTIME["jobs"].get, job)
    if rec is None:
        return error(404, f"no job {job!r}", "job")
    if rec.state != "done":
        return error(409, f"job {rec.id} is {rec.state}" + (f": {rec.error}" if rec.error else ""), "job")
    path = Path(rec.result)
    if not path.is_file():
        return error(410, f"job {rec.id}: its result archive is gone from the server", "job")
    return FileResponse(path, media_type="application/gzip", filename=f"cxrgen-augment-{rec.id}.tar.gz")


@app.get("/ui", response_class=FileResponse, responses={200: {"content": {"text/html": {}}}})
async def ui():
    """The expert rating page."""
    page = STATIC / "ui.html"
    if not page.is_file():
        return error(404, "the rating page is not installed")
    return FileResponse(page, media_type="text/html")
