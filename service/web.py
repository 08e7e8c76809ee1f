"""The service's GET routes, as a Starlette app mounted into the BentoML service (issue 9, section 2).

An ``@bentoml.api`` route answers POST only, so the feedback stream, the models list, job status
and results, stored images and the ``/ui`` page live here. Every handler is async and does its
database work in a worker thread, so none of them waits behind a running generation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

log = logging.getLogger("cxrgen.service")
STATIC = Path(__file__).resolve().parent / "static"
RUNTIME: dict = {}  # set by the service instance: cfg, store, jobs, engine, metrics
STREAM_PAGE = 200  # events read per query while streaming


def error(status: int, message: str, field: str | None = None) -> JSONResponse:
    body = {"error": message}
    if field:
        body["field"] = field
    return JSONResponse(body, status_code=status)


def int_param(request: Request, name: str, default: int, lo: int, hi: int) -> int:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        v = int(raw)
    except ValueError:
        raise ValueError(f"{name}: expected an integer, got {raw[:40]!r}") from None
    if not lo <= v <= hi:
        raise ValueError(f"{name}: must be in [{lo}, {hi}], got {v}")
    return v


def bool_param(request: Request, name: str, default: bool) -> bool:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    if raw.lower() in ("1", "true", "yes"):
        return True
    if raw.lower() in ("0", "false", "no"):
        return False
    raise ValueError(f"{name}: expected true or false, got {raw[:40]!r}")


def _field(e: ValueError) -> str:
    return str(e).split(":", 1)[0]


# ------------------------------------------------------------------ feedback


async def stream(request: Request) -> Response:
    """NDJSON of every event after ``after``, read and sent a page at a time, then a final status line."""
    from training.feedback.exchange import iter_export

    try:
        after = int_param(request, "after", 0, 0, 2**62)
        images = bool_param(request, "images", True)
        limit = int_param(request, "limit", 0, 0, 10**9)
    except ValueError as e:
        return error(400, str(e), _field(e))
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


async def criteria(_: Request) -> Response:
    from training.feedback.models import CRITERIA

    return JSONResponse({"criteria": list(CRITERIA)})


def _item(g) -> dict:
    return {"id": g.id, "prompt": g.prompt, "findings": g.findings, "image_url": f"/generations/{g.id}/image.png"}


async def queue(request: Request) -> Response:
    """What a rater has not rated (mode=rate) or compared (mode=compare) yet: the rating page's work list."""
    rater = request.query_params.get("rater", "")
    mode = request.query_params.get("mode", "rate")
    if not re.fullmatch(r"[A-Za-z0-9_.@-]{1,255}", rater):
        return error(400, "rater: 1-255 characters of letters, digits, _ . @ -", "rater")
    if mode not in ("rate", "compare"):
        return error(400, f"mode: expected rate or compare, got {mode[:20]!r}", "mode")
    try:
        limit = int_param(request, "limit", 10, 1, 100)
    except ValueError as e:
        return error(400, str(e), "limit")
    store = RUNTIME["store"]
    if mode == "rate":
        gens = await asyncio.to_thread(store.unrated, rater, limit)
        return JSONResponse({"items": [_item(g) for g in gens]})
    pairs = await asyncio.to_thread(store.uncompared_pairs, rater, limit)
    return JSONResponse({"items": [{"prompt": a.prompt, "findings": a.findings, "a": _item(a), "b": _item(b)}
                                   for a, b in pairs]})


async def image(request: Request) -> Response:
    from training.feedback.errors import UnknownReference

    gid = int(request.path_params["gid"])
    try:
        data = await asyncio.to_thread(RUNTIME["store"].image_bytes, gid)
    except (UnknownReference, FileNotFoundError):
        return error(404, f"no generation with id {gid}", "id")
    return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})


# ------------------------------------------------------------------ models and jobs


async def models(_: Request) -> Response:
    engine = RUNTIME["engine"]
    if engine.model is None:
        return error(503, "models are still loading")
    rewards = await asyncio.to_thread(engine.reward_versions)
    registered = await asyncio.to_thread(_bento_models)
    return JSONResponse({"serving": engine.model.info(), "rewards": rewards, "registered": registered,
                         "ready": engine.ready})


def _bento_models() -> list[dict]:
    from service.engine import BENTO_MODEL

    try:
        import bentoml

        return [{"tag": str(m.tag), "version": m.info.metadata.get("version"), "created": str(m.creation_time)}
                for m in bentoml.models.list(BENTO_MODEL)]
    except Exception:  # no model store on this machine
        return []


def job_view(job) -> dict:
    rate = round(job.done / job.sampled, 4) if job.sampled else None
    return {"id": job.id, "kind": job.kind, "state": job.state, "total": job.total, "done": job.done,
            "sampled": job.sampled, "acceptance_rate": rate, "progress": round(job.done / max(job.total, 1), 4),
            "error": job.error, "result_url": f"/augment/{job.id}/result" if job.state == "done" else None,
            "created": job.created, "updated": job.updated, "spec": job.spec}


async def job_status(request: Request) -> Response:
    job = await asyncio.to_thread(RUNTIME["jobs"].get, request.path_params["job"])
    if job is None:
        return error(404, f"no job {request.path_params['job'][:64]!r}", "job")
    return JSONResponse(job_view(job))


async def job_result(request: Request) -> Response:
    job = await asyncio.to_thread(RUNTIME["jobs"].get, request.path_params["job"])
    if job is None:
        return error(404, f"no job {request.path_params['job'][:64]!r}", "job")
    if job.state != "done":
        return error(409, f"job {job.id} is {job.state}" + (f": {job.error}" if job.error else ""), "job")
    path = Path(job.result)
    if not path.is_file():
        return error(410, f"job {job.id}: its result archive is gone from the server", "job")
    return FileResponse(path, media_type="application/gzip", filename=f"cxrgen-augment-{job.id}.tar.gz")


async def ui(_: Request) -> Response:
    page = STATIC / "ui.html"
    if not page.is_file():
        return error(404, "the rating page is not installed")
    return FileResponse(page, media_type="text/html")


app = Starlette(routes=[
    Route("/feedback/stream", stream, methods=["GET"]),
    Route("/feedback/criteria", criteria, methods=["GET"]),
    Route("/feedback/queue", queue, methods=["GET"]),
    Route("/generations/{gid:int}/image.png", image, methods=["GET"]),
    Route("/models", models, methods=["GET"]),
    Route("/augment/{job:str}", job_status, methods=["GET"]),
    Route("/augment/{job:str}/result", job_result, methods=["GET"]),
    Route("/ui", ui, methods=["GET"]),
])
