"""The inference engine behind the service: models loaded once, a micro-batcher, scoring, hot reload.

Batching (issue 9, section 3) is a micro-batcher of our own, not BentoML's adaptive batching:

* BentoML's batchable API takes one list argument behind a second service (``bentoml.depends``), so
  every request would cross a process boundary; it concatenates whatever arrives into one call,
  while a denoising run can only share requests with the same steps, guidance, scheduler and size;
  and its order inside a batch is not guaranteed, so results would need re-keying anyway.
* Ours: one worker thread owns the pipeline. It takes the oldest queued request and every queued
  request compatible with it, up to ``max_batch`` images, and runs them as one denoising batch, each
  image with its own seeded generator (the same image as ``cxrgen generate`` for that seed). It never
  waits for a batch to fill (unless ``batch_wait_ms`` says so): requests that arrive during a run
  form the next batch, so a lone request pays no batching delay and a busy server batches itself.

Reload: a new checkpoint is loaded beside the serving one (no request waits for it); the worker
thread picks up the new model between two batches, so no request fails or is dropped, and a load
that fails leaves the old model serving and raises with the cause. The choice is written to
``data_dir/active-model.json`` so every worker process of the server follows it.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import logging
import os
import threading
import time
from pathlib import Path

import numpy as np

from .config import ServeConfig

log = logging.getLogger("cxrgen.service")
BENTO_MODEL = "cxrgen-generator"  # name under which `cxrgen import` registers checkpoints


class ModelLoadError(ValueError):
    """A checkpoint could not be loaded; the message says which and why."""


@dataclasses.dataclass
class Model:
    runner: object  # the backend (training.generation.load_backend): torch, onnxruntime, tensorrt or triton
    version: str
    source: str  # what was asked for (path or bento:tag)
    path: str  # the folder loaded
    manifest: dict
    device: str
    native_size: int
    loaded_at: float

    @property
    def backend(self) -> str:
        """The backend's name: /models reports it and the metrics carry it as their ``backend`` label."""
        return self.runner.name

    @property
    def pipe(self):
        """The diffusers pipeline (torch backend only)."""
        return self.runner.pipe

    def info(self) -> dict:
        extra = {"backend_url": self.runner.url} if getattr(self.runner, "url", None) else {}
        return {"version": self.version, "source": self.source, "path": self.path, "device": self.device,
                "backend": self.backend, **extra, "native_size": self.native_size,
                "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at)),
                "stage": self.manifest.get("stage"), "parent": self.manifest.get("parent_version"),
                "created": self.manifest.get("created"), "metrics": self.manifest.get("metrics", {})}


def registered_models() -> list:
    """The ``cxrgen-generator`` checkpoints in the BentoML model store, oldest first ([] without a store)."""
    try:
        import bentoml

        return sorted(bentoml.models.list(BENTO_MODEL), key=lambda m: m.creation_time)
    except Exception as e:  # no model store on this machine yet
        log.debug("no BentoML model store: %s", e)
        return []


def resolve_source(source: str | None) -> tuple[str, Path]:
    """(source, folder): a path, ``bento:<tag>``, else the newest ``cxrgen-generator`` in the BentoML model
    store, else the embedded default checkpoint."""
    from training.generation import DEFAULT_MODEL

    if source and source.startswith("bento:"):
        import bentoml

        try:
            return source, Path(bentoml.models.get(source[len("bento:"):]).path)
        except Exception as e:  # bentoml raises NotFound / BentoMLException subclasses
            raise ModelLoadError(f"{source}: not in the BentoML model store ({type(e).__name__}: {e})") from e
    if source:
        return source, Path(source)
    models = registered_models()
    if models:
        return f"bento:{models[-1].tag}", Path(models[-1].path)
    return "default", DEFAULT_MODEL


def load_model(source: str | None, device: str, backend: str | None = None, triton_url: str | None = None,
               torch_compile: bool = False) -> Model:
    """Load a generator through ``training.generation.load_backend``: ``backend`` None picks torch for a
    checkpoint, onnxruntime for an export folder, triton for a Triton repository. torch on CUDA runs an fp16
    U-Net and text encoder with an fp32 VAE (fp16 decoding clips)."""
    from training.generation import default_backend, load_backend

    from diffusers.utils import logging as diffusers_logging

    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()  # a server log is not a terminal
    transformers_logging.disable_progress_bar()
    # diffusers warns about over-long prompts by quoting the cut tokens: prompt text must stay out of logs.
    diffusers_logging.set_verbosity_error()
    source, folder = resolve_source(source)
    try:
        is_dir = folder.is_dir()
    except OSError as e:  # a name too long, a permission problem: the client's path, not our crash
        raise ModelLoadError(f"{source[:200]}: cannot read {str(folder)[:200]}: {e.strerror}") from e
    if not is_dir:
        raise ModelLoadError(f"{source[:200]}: no checkpoint folder at {str(folder)[:200]}")
    name = backend or default_backend(folder)
    options = {"half": device.startswith("cuda"), "compile": torch_compile} if name == "torch" else {}
    if name == "triton" and triton_url:
        options["url"] = triton_url
    try:
        runner = load_backend(name, folder, device, **options)
    except (ValueError, OSError) as e:  # CheckpointError / ExportError are ValueErrors; the message says what
        raise ModelLoadError(str(e)) from e
    return Model(runner=runner, version=runner.version, source=source, path=str(folder), manifest=_manifest(runner),
                 device=device, native_size=int(runner.native_size), loaded_at=time.time())


def _manifest(runner) -> dict:
    """The checkpoint manifest as a dict: torch's from the checkpoint, an export's from its copy."""
    if getattr(runner, "manifest", None) is not None:
        return dataclasses.asdict(runner.manifest)
    export = getattr(runner, "export", None)
    path = export.root / "cxrgen_manifest.json" if export is not None else None
    if path is not None and path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            log.warning("unreadable checkpoint manifest %s", path)
    return {}


def run_batch(model: Model, settings: tuple, prompts: list[str], negatives: list[str], seeds: list[int]) -> np.ndarray:
    """One denoising run on the model's backend: images (N, H, W) in [0, 1], image i from a CPU generator seeded
    ``seeds[i]`` (as ``training.generation.generate`` does, so the same seed gives the same image)."""
    steps, guidance, scheduler, size = settings
    return model.runner.run_batch(prompts, negatives, seeds, steps, guidance, scheduler, size)


@dataclasses.dataclass
class _Pending:
    settings: tuple
    prompts: list[str]
    negatives: list[str]
    seeds: list[int]
    findings: list[list[dict]]
    future: cf.Future
    queued: float


class Engine:
    """Models, the batch worker thread and scoring; one per server worker process."""

    def __init__(self, cfg: ServeConfig, metrics=None) -> None:
        self.cfg = cfg
        self.metrics = metrics
        self.device = cfg.resolved_device()
        self.model: Model | None = None
        self.scorer = None
        self.diagnosis = None
        self.ready = False
        self.ready_event = threading.Event()  # set with ready: requests that arrive during start-up wait on it
        self._queue: list[_Pending] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._worker: threading.Thread | None = None
        self._watcher: threading.Thread | None = None
        self._reload_lock = threading.Lock()
        self._active_mtime = 0.0

    # 1. start-up -------------------------------------------------------------------------------
    def start(self) -> None:
        """Load the generator and rewards, start the batch worker, run the warm-up generation."""
        source = self._active_choice() or self.cfg.model
        self.model = load_model(source, self.device, self.cfg.backend, self.cfg.triton_url, self.cfg.torch_compile)
        self._load_rewards()
        if self.metrics:
            self.metrics.model_loaded(self.model.version, None)
        self._worker = threading.Thread(target=self._loop, name="cxrgen-batcher", daemon=True)
        self._worker.start()
        if self.cfg.warmup:
            t = time.perf_counter()
            self.generate_sync(["normal chest radiograph"], [""], [0], (self.cfg.warmup_steps, 4.0, "ddim",
                                                                        self.model.native_size))
            log.info("warm-up generation took %.2f s", time.perf_counter() - t)
        self._watcher = threading.Thread(target=self._watch, name="cxrgen-model-watch", daemon=True)
        self._watcher.start()
        self.ready = True
        self.ready_event.set()
        log.info("cxrgen engine ready: model %s (%s), backend %s on %s", self.model.version, self.model.source,
                 self.model.backend, self.device)

    def _load_rewards(self) -> None:
        from training.reward.base import available, cached_reward, generation_scorer

        names = available(self.cfg.reward_dir)
        if not names:
            log.warning("no reward models under %s: images are served without scores",
                        self.cfg.reward_dir or "models/rewards")
            return
        self.scorer = generation_scorer(self.cfg.reward_dir, self.device)
        if "diagnosis" in names:
            self.diagnosis = cached_reward("diagnosis", self.cfg.reward_dir, self.device)

    def reward_versions(self) -> dict[str, str]:
        from training.reward.base import available, cached_reward

        return {n: cached_reward(n, self.cfg.reward_dir, self.device).version for n in available(self.cfg.reward_dir)}

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()

    # 2. requests -------------------------------------------------------------------------------
    def submit(self, prompts: list[str], negatives: list[str], seeds: list[int], settings: tuple,
               findings: list[list[dict]] | None = None) -> cf.Future:
        """Queue images for the batch worker; the future resolves to (images, model, [(scores, agreement)]).

        Scoring runs on the batch worker too: one thread does all of the torch work, because two threads
        each running OpenMP teams on the same cores slow each other down (measured: sampling 35% slower
        while another thread scored)."""
        fut: cf.Future = cf.Future()
        findings = [list(f) for f in findings] if findings is not None else [[] for _ in prompts]
        with self._cond:
            self._queue.append(_Pending(settings, list(prompts), list(negatives), list(seeds), findings, fut,
                                        time.perf_counter()))
            self._cond.notify()
        if self.metrics:
            self.metrics.queue_depth(self.queued_images())
        return fut

    def generate_sync(self, prompts, negatives, seeds, settings, findings=None):
        return self.submit(prompts, negatives, seeds, settings, findings).result()

    def queued_images(self) -> int:
        with self._cond:
            return sum(len(p.seeds) for p in self._queue)

    def settings(self, steps: int, guidance: float, scheduler: str, size: int | None) -> tuple:
        return (int(steps), float(guidance), str(scheduler), int(size or self.model.native_size))

    # 3. the batch worker -----------------------------------------------------------------------
    def _take(self) -> list[_Pending]:
        """The oldest request and every queued one with the same settings, up to max_batch images."""
        with self._cond:
            while not self._queue and not self._stop.is_set():
                self._cond.wait(0.5)
            if self._stop.is_set():
                return []
            if self.cfg.batch_wait_ms > 0 and self.cfg.max_batch > 1:
                deadline = time.monotonic() + self.cfg.batch_wait_ms / 1000
                while sum(len(p.seeds) for p in self._queue) < self.cfg.max_batch and time.monotonic() < deadline:
                    self._cond.wait(max(0.0, deadline - time.monotonic()))
            first = self._queue[0]
            chosen, n = [], 0
            for p in self._queue:
                if p.settings == first.settings and (not chosen or n + len(p.seeds) <= self.cfg.max_batch):
                    chosen.append(p)
                    n += len(p.seeds)
            for p in chosen:
                self._queue.remove(p)
            return chosen

    def _loop(self) -> None:
        while not self._stop.is_set():
            chosen = self._take()
            if not chosen:
                continue
            model = self.model  # a reload swaps self.model; this batch finishes on the one it started with
            prompts = [x for p in chosen for x in p.prompts]
            findings = [x for p in chosen for x in p.findings]
            negatives = [x for p in chosen for x in p.negatives]
            seeds = [x for p in chosen for x in p.seeds]
            try:
                t = time.perf_counter()
                images = np.concatenate([
                    run_batch(model, chosen[0].settings, prompts[i:i + self.cfg.max_batch],
                              negatives[i:i + self.cfg.max_batch], seeds[i:i + self.cfg.max_batch])
                    for i in range(0, len(prompts), self.cfg.max_batch)])
                took = time.perf_counter() - t
                scored = self.score(images, prompts, findings)
            except Exception as e:  # hand the failure to every waiting request, keep serving
                log.exception("batch of %d images failed", len(prompts))
                for p in chosen:
                    p.future.set_exception(e)
                continue
            if self.metrics:
                self.metrics.batch(len(prompts), took, chosen[0].settings[3], model.backend)
                self.metrics.queue_depth(self.queued_images())
            start = 0
            for p in chosen:
                end = start + len(p.seeds)
                p.future.set_result((images[start:end], model, scored[start:end]))
                start = end

    # 4. scoring --------------------------------------------------------------------------------
    def score(self, images: np.ndarray, prompts: list[str], findings: list[list[dict]]) -> list[tuple[dict, dict]]:
        """(reward scores, per-finding agreement) per image; empty dicts when no rewards are installed."""
        if self.scorer is None:
            return [({}, {}) for _ in prompts]
        import torch

        from training.reward.data import parse_findings
        from training.reward.diagnosis import finding_agreement

        scores = self.scorer(images, prompts, findings)
        if self.diagnosis is not None:
            x = torch.as_tensor(images, dtype=torch.float32)[:, None] * 2 - 1
            agree = finding_agreement(self.diagnosis, x, [parse_findings(f) for f in findings])
        else:
            agree = [{} for _ in prompts]
        if self.metrics:
            for s in scores:
                self.metrics.scores(s)
        return list(zip(scores, agree))

    # 5. reload ---------------------------------------------------------------------------------
    def reload(self, source: str, follow: bool = False) -> dict:
        """Load ``source`` beside the serving model, then switch; on failure the old one keeps serving.

        ``follow``: the switch another worker made (read from active-model.json). A follower does not write the
        file again: loading takes seconds, and a newer choice written meanwhile must not be overwritten by an
        older one (the workers would all end on the older model); the next poll follows the newer one."""
        with self._reload_lock:
            previous = self.model
            # failure: nothing changed
            new = load_model(source, self.device, self.cfg.backend, self.cfg.triton_url, self.cfg.torch_compile)
            self.model = new
            if not follow:
                self._write_active(source)
        if self.metrics:
            self.metrics.model_loaded(new.version, previous.version if previous else None)
        log.info("model reloaded: %s -> %s", previous.version if previous else None, new.version)
        return {"model_version": new.version, "previous": previous.version if previous else None,
                "source": new.source}

    def _active_file(self) -> Path:
        return Path(self.cfg.data_dir) / "active-model.json"

    def _active_choice(self) -> str | None:
        f = self._active_file()
        if not f.is_file():
            return None
        try:
            self._active_mtime = f.stat().st_mtime
            return json.loads(f.read_text())["source"]
        except (OSError, ValueError, KeyError):
            return None

    def _write_active(self, source: str) -> None:
        f = self._active_file()
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_name(f".{f.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"source": source, "time": time.time()}))
        os.replace(tmp, f)
        self._active_mtime = f.stat().st_mtime

    def _watch(self) -> None:
        """Follow a reload done by another worker process (it rewrites active-model.json)."""
        while not self._stop.wait(self.cfg.reload_poll_s):
            self._follow()

    def _follow(self) -> None:
        """One poll: if active-model.json changed since this worker last read or wrote it, switch to its model."""
        f = self._active_file()
        try:
            mtime = f.stat().st_mtime
        except OSError:
            return
        if mtime != self._active_mtime:
            source = self._active_choice()
            if source and (self.model is None or source != self.model.source):
                try:
                    self.reload(source, follow=True)
                except ModelLoadError as e:
                    log.error("could not follow the model switch to %s: %s", source, e)
