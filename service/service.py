"""The cxrgen BentoML service (issue 9): ``bentoml serve service.service:CXRGen`` (or ``make serve``).

POST routes are ``@bentoml.api`` methods with flat pydantic bodies (``input_spec``); GET routes are
the Starlette app in ``web.py``; ``/augment`` is a ``@bentoml.task`` whose state lives in the
feedback database (``training.feedback.jobs``). Every method is async and does blocking work in a
thread, so feedback, the stream and health checks never queue behind a generation (a sync BentoML
API serves one request at a time per worker). Configuration: ``config.ServeConfig`` (environment).
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import secrets
import threading
import time

import bentoml
from starlette.responses import JSONResponse, Response

from . import bentoml_fixes
from .config import ServeConfig
from .schemas import (AugmentRequest, ComparisonIn, GenerateRequest, GenerateResponse, Limits, PngRequest, RatingIn,
                      ReloadRequest)
from .security import Guard, install_log_redaction, parse_keys, parse_limits
from .web import READY_WAIT_S, RUNTIME, app as web_app, error

log = logging.getLogger("cxrgen.service")
bentoml_fixes.install()  # BentoML's request timeout keeps every request's span for traffic.timeout s otherwise
CFG = ServeConfig.from_env()
Limits.max_work = CFG.max_work
Limits.max_job_work = CFG.max_job_work
KEYS = parse_keys(CFG.keys, CFG.keys_file)
LIMITS = parse_limits(CFG.rate_limits)  # a malformed CXRGEN_RATE_LIMITS stops the start-up, naming the entry
# No keys: an open service must not be reachable from other machines.
HOST = "0.0.0.0" if KEYS else "127.0.0.1"
JOB_STALE_S = 1800  # an augmentation job not updated for this long no longer counts against CXRGEN_MAX_JOBS


@bentoml.service(name="cxrgen", http={"host": HOST, "port": 3000},
                 traffic={"timeout": 3600, "max_concurrency": 256},
                 workers=int(os.environ.get("CXRGEN_WORKERS", "1")))
@bentoml.asgi_app(web_app, path="/")
class CXRGen:
    def __init__(self) -> None:
        from training.feedback.jobs import Jobs
        from training.feedback.store import open_store

        from .engine import Engine
        from .metrics import metrics

        install_log_redaction()
        if not KEYS:
            log.warning("cxrgen: no API keys configured (CXRGEN_API_KEYS / CXRGEN_API_KEYS_FILE): every endpoint "
                        "is open, so the server binds to localhost only (127.0.0.1)")
        self.cfg = CFG
        self.metrics = metrics()
        self.store = open_store(CFG.store, CFG.blobs)
        self.jobs = Jobs(self.store)
        self.known_raters: set[str] = set()  # raters this worker has made sure exist in the store
        failed = self.jobs.fail_orphans()
        if failed:
            log.warning("marked %d interrupted augmentation job(s) failed: %s", len(failed), ", ".join(failed))
        self.engine = Engine(CFG, self.metrics)
        RUNTIME.update(cfg=CFG, store=self.store, jobs=self.jobs, engine=self.engine, metrics=self.metrics)
        self.metrics.start_gpu()
        self.load_error: str | None = None
        # Load in the background: /livez answers at once, /readyz once the warm-up generation ran.
        threading.Thread(target=self._start_engine, name="cxrgen-load", daemon=True).start()

    def _start_engine(self) -> None:
        try:
            self.engine.start()
        except Exception as e:  # never ready; /readyz stays 503 and the log says why
            self.load_error = f"{type(e).__name__}: {e}"
            self.engine.ready_event.set()  # release waiting requests: they get the 503 naming the failure
            log.exception("cxrgen: the models failed to load")

    def __is_ready__(self) -> bool:
        return self.engine.ready

    # ------------------------------------------------------------------ generation

    @bentoml.api(route="/generate", input_spec=GenerateRequest)
    async def generate(self, **body) -> GenerateResponse:
        """Synthetic CXRs for a prompt and / or structured findings, each scored by the reward models and
        stored in the feedback store under the returned ``id`` (rate or compare it by that id)."""
        return await self._generate(GenerateRequest.model_construct(**body), "generate")

    @bentoml.api(route="/generate/png", input_spec=PngRequest)
    async def generate_png(self, **body):
        """One image as ``image/png`` (with provenance chunks); id, seed and scores in X-Cxrgen-* headers."""
        out = await self._generate(PngRequest.model_construct(**body), "generate_png")
        if isinstance(out, Response):
            return out
        im = out.images[0]
        return Response(base64.b64decode(im.image), media_type="image/png", headers={
            "X-Cxrgen-Id": str(im.id), "X-Cxrgen-Seed": str(im.seed), "X-Cxrgen-Model": out.model_version,
            "X-Cxrgen-Scores": json.dumps(im.scores)})

    async def _generate(self, req: GenerateRequest, endpoint: str):
        if not self.engine.ready and not self.load_error:
            # Readiness is per worker: with several, /readyz may answer from one while this one still loads.
            # Wait for it (bounded) rather than fail a request the load balancer already sent here.
            await asyncio.to_thread(self.engine.ready_event.wait, READY_WAIT_S)
        if not self.engine.ready:
            if self.load_error:
                return error(503, "the models failed to load on this server; see its log")
            return error(503, "the model is still loading; retry when /readyz answers 200")
        prompt, findings = await asyncio.to_thread(self._prompt, req)
        seed = req.seed if req.seed is not None else secrets.randbelow(2**31 - 1 - req.n)
        seeds = [seed + i for i in range(req.n)]
        settings = self.engine.settings(req.steps, req.guidance, req.scheduler, req.size)
        if req.key:
            stored = await asyncio.to_thread(self._stored, req, prompt, findings, seeds)
            if stored is not None:
                return stored
        try:
            images, model, scored = await asyncio.wrap_future(self.engine.submit(
                [prompt] * req.n, [req.negative_prompt] * req.n, seeds, settings, [findings] * req.n))
        except Exception as e:
            log.error("generation failed: %s", type(e).__name__)
            return error(503, f"generation failed on the server ({type(e).__name__}); retry later")
        if not req.score:
            scored = [({}, {}) for _ in seeds]
        out = await asyncio.to_thread(self._finish, req, prompt, findings, seeds, images, scored, model.version,
                                      model.path)
        self.metrics.generated(req.n, endpoint)
        return out

    def _prompt(self, req: GenerateRequest) -> tuple[str, list[dict]]:
        """The prompt (written from the findings when none is given) and the findings (read from the text
        when none are given)."""
        from training.data.reports import findings_from_text
        from training.findings import Finding
        from training.generation import findings_prompt

        found = [Finding(f.kind, f.side, f.severity, f.lobe) for f in (req.findings or [])]
        prompt = req.prompt.strip() if req.prompt and req.prompt.strip() else findings_prompt(found, req.seed or 0)
        if not req.findings:
            found = findings_from_text(prompt)
        return prompt, [f.to_dict() for f in found]

    def _sampler(self, req: GenerateRequest, size: int) -> dict:
        return {"steps": req.steps, "guidance_scale": req.guidance, "scheduler": req.scheduler,
                "negative_prompt": req.negative_prompt, "height": size, "width": size}

    def _finish(self, req, prompt, findings, seeds, images, scored, version, path) -> GenerateResponse:
        """Encode with provenance and scores, store; the response (no torch work here: see Engine.submit)."""
        from training.provenance import Provenance, encode

        size = int(images.shape[-1])
        out = []
        for i, (img, seed, (scores, agree)) in enumerate(zip(images, seeds, scored)):
            prov = Provenance(model_version=version, model_path=path, seed=seed, prompt=prompt,
                              negative_prompt=req.negative_prompt, steps=req.steps, guidance_scale=req.guidance,
                              scheduler=req.scheduler, height=size, width=size, findings=findings,
                              scores=scores)
            png = encode(img, prov, "png")
            gid = self.store.add_generation(image=png, prompt=prompt, findings=findings, seed=seed,
                                            sampler=self._sampler(req, size), model_version=version,
                                            key=f"{req.key}:{i}" if req.key else None)
            data = png if req.format == "png" else encode(img, prov, "dicom")
            out.append({"id": gid, "seed": seed, "media_type": "image/png" if req.format == "png" else
                        "application/dicom", "image": base64.b64encode(data).decode("ascii"), "scores": scores,
                        "finding_agreement": agree})
        return GenerateResponse(model_version=version, prompt=prompt, findings=findings, images=out)

    def _stored(self, req, prompt, findings, seeds) -> GenerateResponse | None:
        """A retried request (same idempotency key): the images stored the first time, rescored."""
        import numpy as np

        from training.feedback.blobs import decode
        from training.provenance import encode, read_png_provenance

        ids = [self.store.generation_id(f"{req.key}:{i}") for i in range(req.n)]
        if any(i is None for i in ids):
            return None
        recs = self.store.generations(ids)
        pngs = [self.store.image_bytes(g.id) for g in recs]  # each image read once
        images = np.stack([decode(b) for b in pngs]).astype("float32") / 255.0
        scored = self.engine.score(images, [g.prompt for g in recs], [g.findings for g in recs])
        out = []
        for g, data, img, (scores, agree) in zip(recs, pngs, images, scored):
            if req.format == "dicom":  # the stored PNG carries the provenance the DICOM needs
                data = encode(img, read_png_provenance(self.store.image_path(g.id)), "dicom")
            out.append({"id": g.id, "seed": g.seed,
                        "media_type": "application/dicom" if req.format == "dicom" else "image/png",
                        "image": base64.b64encode(data).decode("ascii"), "scores": scores,
                        "finding_agreement": agree})
        return GenerateResponse(model_version=recs[0].model_version, prompt=recs[0].prompt,
                                findings=recs[0].findings, images=out)

    # ------------------------------------------------------------------ feedback

    @bentoml.api(route="/feedback/rating", input_spec=RatingIn)
    async def feedback_rating(self, **body) -> dict:
        """An expert's rating of a stored generation: plausible or not, with the failed criteria."""
        r = RatingIn.model_construct(**body)
        return await self._feedback("rating", lambda: self.store.add_rating(
            generation_id=r.generation_id, rater_id=r.rater_id, plausible=r.plausible, failed=list(r.failed),
            score=r.score, comment=r.comment, key=r.key), r.rater_id, "generation_id")

    @bentoml.api(route="/feedback/comparison", input_spec=ComparisonIn)
    async def feedback_comparison(self, **body) -> dict:
        """An expert's preference between two stored generations (of the same prompt): a, b or tie."""
        c = ComparisonIn.model_construct(**body)
        return await self._feedback("comparison", lambda: self.store.add_comparison(
            generation_a=c.generation_a, generation_b=c.generation_b, preferred=c.preferred, rater_id=c.rater_id,
            key=c.key), c.rater_id, "generation_a")

    async def _feedback(self, kind: str, write, rater_id: str, field: str):
        from training.feedback.errors import StoreError, UnknownReference

        def run():
            if rater_id not in self.known_raters:  # one write per new rater, not one per feedback
                self.store.add_rater(rater_id, "expert", "registered by the cxrgen service on first feedback")
                self.known_raters.add(rater_id)
            rid = write()
            return (self.store.rating(rid) if kind == "rating" else self.store.comparison(rid)).to_dict()

        try:
            rec = await asyncio.to_thread(run)
        except UnknownReference as e:
            msg = str(e)
            return error(404, msg, msg.split(":", 1)[0] if ":" in msg else field)
        except StoreError as e:
            return error(422, str(e), field)
        self.metrics.feedback_received(kind)
        return rec

    # ------------------------------------------------------------------ models

    @bentoml.api(route="/models/reload", input_spec=ReloadRequest)
    async def models_reload(self, source: str) -> dict:
        """Switch to another checkpoint (folder or bento:<tag>) with no failed or dropped request; a failed
        load keeps the serving model and answers 422 with the reason."""
        from .engine import ModelLoadError

        if not self.engine.ready:
            return error(503, "the model is still loading")
        try:
            return await asyncio.to_thread(self.engine.reload, source)
        except ModelLoadError as e:
            return error(422, f"{e} (still serving {self.engine.model.version})", "source")

    # ------------------------------------------------------------------ augmentation

    @bentoml.task(route="/augment", input_spec=AugmentRequest)
    async def augment(self, ctx: bentoml.Context, **body) -> dict:
        """An augmentation batch for data teams: POST /augment (or /augment/submit) answers a task id at
        once; GET /augment/{id} gives state and progress, GET /augment/{id}/result the tar.gz (MIMIC-CXR-JPG
        layout with manifest.json). State lives in cxrgen's database and survives restarts."""
        req = AugmentRequest.model_construct(**body)
        job_id = getattr(ctx.request.state, "task_id", None) or secrets.token_hex(16)
        spec = req.to_spec()
        job = await asyncio.to_thread(self.jobs.create, "augment", _jsonable(vars(spec)), spec.count, job_id)
        try:
            summary = await asyncio.to_thread(self._run_job, job.id, spec)
        except Exception as e:
            await asyncio.to_thread(self.jobs.fail, job.id, f"{type(e).__name__}: {e}")
            self.metrics.job_finished("failed")
            log.error("augment job %s failed: %s", job.id, type(e).__name__)
            return {"job_id": job.id, "state": "failed", "error": f"{type(e).__name__}: {e}"}
        self.metrics.job_finished("done")
        return summary

    def _run_job(self, job_id: str, spec) -> dict:
        from training.augment import pack, run

        while not self.engine.ready:  # a job submitted during start-up waits for the models
            if self.load_error:
                raise RuntimeError(f"the models failed to load: {self.load_error}")
            time.sleep(0.5)
        self.jobs.start(job_id)
        folder = self.cfg.jobs_dir / job_id / "cxrgen-augment"
        settings = self.engine.settings(spec.steps, spec.guidance, spec.scheduler, spec.size)

        def sample(prompts, findings, seeds):
            images, _, scored = self.engine.generate_sync(prompts, [""] * len(prompts), seeds, settings, findings)
            self.metrics.generated(len(prompts), "augment")
            return images, [s for s, _ in scored]

        manifest = run(spec, folder, sample, progress=lambda done, sampled: self.jobs.progress(job_id, done, sampled),
                       model_version=self.engine.model.version)
        archive = pack(folder, self.cfg.jobs_dir / job_id / f"cxrgen-augment-{job_id}.tar.gz")
        self.jobs.finish(job_id, str(archive.resolve()), manifest["accepted"], manifest["sampled"])
        return {"job_id": job_id, "state": "done", "accepted": manifest["accepted"], "sampled": manifest["sampled"],
                "acceptance_rate": manifest["acceptance_rate"], "result_url": f"/augment/{job_id}/result"}


def _active_jobs() -> int:
    """Augmentation jobs queued or running in the store (all workers and replicas that share it)."""
    jobs = RUNTIME.get("jobs")
    if jobs is None:  # not started yet: the task itself waits for the models
        return 0
    import datetime as dt

    # A job whose row has not moved for JOB_STALE_S was left behind by a server that died on another host
    # (fail_orphans only sees this host's): it must not hold a slot for ever.
    since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=JOB_STALE_S)
    n = 0
    for state in ("queued", "running"):
        for j in jobs.list(state, limit=100):
            updated = dt.datetime.fromisoformat(j.updated)
            n += (updated if updated.tzinfo else updated.replace(tzinfo=dt.timezone.utc)) >= since
    return n


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d))


class AugmentGate:
    """``POST /augment`` answers like ``POST /augment/submit`` (a task id, at once: BentoML's plain route
    of a task would run the whole batch inside the request), and both validate the body first: BentoML
    accepts any body at submit and fails the task later, which would hand out ids of doomed jobs."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in ("/augment",
                                                                                         "/augment/submit"):
            return await self.app(scope, receive, send)
        from pydantic import ValidationError

        from .security import read_body, replay

        body = await read_body(receive, CFG.max_body_bytes)
        try:
            AugmentRequest.model_validate_json(body or b"")
        except ValidationError as e:
            payload = {"error": f"{e.error_count()} validation error for AugmentRequest",
                       "detail": e.errors(include_context=False, include_input=False, include_url=False)}
            log.info("rejected augment request: %s", "; ".join(
                f"{'.'.join(map(str, x['loc']))}: {x['type']}" for x in payload["detail"]))
            return await JSONResponse(payload, status_code=400)(scope, receive, send)
        busy = await asyncio.to_thread(_active_jobs)
        if busy >= CFG.max_active_jobs:  # a work budget across requests: each batch may hold the GPU for hours
            return await JSONResponse(
                {"error": f"{busy} augmentation batches are queued or running (this server's limit is "
                          f"{CFG.max_active_jobs}, CXRGEN_MAX_JOBS); retry when one finishes", "field": "count",
                 "limit": {"max_active_jobs": CFG.max_active_jobs}},
                status_code=429, headers={"Retry-After": "60"})(scope, receive, send)
        scope = dict(scope, path="/augment/submit", raw_path=b"/augment/submit")
        await self.app(scope, replay(body, receive), send)


def _count_limited(role: str) -> None:
    from .metrics import metrics

    metrics().limited(role)


CXRGen.add_asgi_middleware(Guard, keys=KEYS, max_body=CFG.max_body_bytes, limits=LIMITS, on_limited=_count_limited)
CXRGen.add_asgi_middleware(AugmentGate)
__all__ = ["CXRGen"]
