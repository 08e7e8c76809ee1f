"""The Stable Diffusion sampling loop over exported graphs, shared by the onnxruntime and TensorRT runners.

It is diffusers' ``StableDiffusionPipeline.__call__`` step for step, so that the same seed gives the
same image as ``training.generation.generate`` on the torch pipeline:

* the scheduler is diffusers' own, built from the checkpoint's scheduler config (swapped like
  ``generation.set_scheduler``), driven with torch tensors exactly as the pipeline drives it;
* initial latents come from ``diffusers.utils.torch_utils.randn_tensor`` with one CPU generator per
  image (seed + i), times ``init_noise_sigma``; the generators also go to ``scheduler.step`` for the
  stochastic samplers, in the same order of draws as the torch pipeline;
* only the three networks run in the backend: ``runner.run(name, feeds) -> {output: array}``. Runners:
  onnxruntime sessions (``ort.OrtRunner``), TensorRT engines (``tensorrt``), and inside Triton's pipeline
  model, BLS requests to the component models (``triton_models/pipeline.py``): one loop for all.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np

from .folder import ExportError, ExportFolder


class Runner(Protocol):
    max_batch: int  # largest batch a graph accepts (the U-Net takes 2x this with guidance)

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


class GraphPipeline:
    """``generate`` / ``scorer`` over an export folder's graphs; ``backend`` names the runner."""

    def __init__(self, export: ExportFolder, runner: Runner, backend: str) -> None:
        self.export, self.runner, self.name = export, runner, backend
        self.facts = export.model
        self.scheduler = self._scheduler(export.root / "scheduler", self.facts.get("scheduler"))
        self.schedulers: dict = {}  # by SCHEDULERS name, for run_batch
        self._tokenizer = None

    @property
    def tokenizer(self):
        """The export's CLIP tokenizer, loaded on first use (a Triton client never tokenizes)."""
        if self._tokenizer is None:
            from transformers import CLIPTokenizer

            self._tokenizer = CLIPTokenizer.from_pretrained(str(self.export.root / "tokenizer"))
        return self._tokenizer

    @staticmethod
    def _scheduler(folder: Path, class_name: str | None):
        import json

        import diffusers

        config = json.loads((folder / "scheduler_config.json").read_text())
        cls = getattr(diffusers, config.get("_class_name") or class_name or "DDIMScheduler")
        return cls.from_config(config)

    @property
    def version(self) -> str:
        return self.export.version

    @property
    def native_size(self) -> int:
        return int(self.facts["image_size"])

    def set_scheduler(self, name: str) -> None:
        """Swap the sampler by ``training.generation.SCHEDULERS`` name, keeping the noise schedule."""
        from training.generation import make_scheduler

        self.scheduler = make_scheduler(name, self.scheduler.config)

    # ------------------------------------------------------------------ sampling

    def encode(self, prompts: Sequence[str], conditional: bool) -> np.ndarray:
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="np").input_ids.astype(np.int64)
        feeds = {"input_ids": ids}
        if self.facts.get("ace_tokens"):
            feeds["conditional"] = np.full(len(prompts), 1.0 if conditional else 0.0, dtype=np.float32)
        return self.runner.run("text_encoder", feeds)["text_embeddings"].astype(np.float32)

    def unet(self, sample: np.ndarray, t: float, embeds: np.ndarray) -> np.ndarray:
        feeds = {"sample": sample, "timestep": np.full(sample.shape[0], t, dtype=np.float32),
                 "encoder_hidden_states": embeds}
        return self.runner.run("unet", feeds)["noise_pred"].astype(np.float32)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Latents -> grey images (N, H, W) in [0, 1]."""
        return self.runner.run("vae_decoder", {"latents": latents})["image"][:, 0].astype(np.float32)

    def step_kwargs(self, generators) -> dict:
        """``StableDiffusionPipeline.prepare_extra_step_kwargs`` with eta = 0."""
        params = set(inspect.signature(self.scheduler.step).parameters)
        return {**({"eta": 0.0} if "eta" in params else {}), **({"generator": generators} if "generator" in params
                                                              else {})}

    def sample(self, prompts: Sequence[str], negative: str | Sequence[str], generators, steps: int, guidance: float,
               size: int) -> np.ndarray:
        """Images for one batch; ``negative`` is one text for all or one per prompt (the service batches
        requests with different negative prompts)."""
        import torch
        from diffusers.utils.torch_utils import randn_tensor

        # 1. text embeddings; classifier-free guidance as diffusers does it (guidance > 1: uncond first)
        cfg = guidance > 1.0
        embeds = self.encode(prompts, conditional=True)
        if cfg:
            negatives = [negative or ""] * len(prompts) if isinstance(negative, str) else [n or "" for n in negative]
            embeds = np.concatenate([self.encode(negatives, conditional=False), embeds])
        # 2. timesteps and initial latents (torch generators: the same draws as the torch pipeline)
        self.scheduler.set_timesteps(steps, device="cpu")
        f = int(self.facts["vae_scale_factor"])
        shape = (len(prompts), int(self.facts["latent_channels"]), size // f, size // f)
        latents = randn_tensor(shape, generator=list(generators), device=torch.device("cpu"), dtype=torch.float32)
        latents = latents * self.scheduler.init_noise_sigma
        extra = self.step_kwargs(list(generators))
        # 3. denoising loop
        for t in self.scheduler.timesteps:
            model_in = torch.cat([latents] * 2) if cfg else latents
            model_in = self.scheduler.scale_model_input(model_in, t)
            noise = torch.from_numpy(self.unet(model_in.numpy(), float(t), embeds))
            if cfg:
                uncond, text = noise.chunk(2)
                noise = uncond + guidance * (text - uncond)
            latents = self.scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
        # 4. decode (scaling, denormalise and grey are inside the graph)
        return self.decode(latents.numpy())

    def generate(self, prompts: list[str], seed: int, steps: int, guidance: float, negative: str,
                 batch_size: int, size: int) -> np.ndarray:
        """Images (N, H, W) in [0, 1], image i from seed + i (as ``training.generation.generate``)."""
        import torch

        f = int(self.facts["vae_scale_factor"])
        if size % f:
            raise ExportError(f"--size must be a multiple of {f}, got {size}")
        batch_size = max(1, min(batch_size, self.runner.max_batch))
        out = []
        for start in range(0, len(prompts), batch_size):
            chunk = prompts[start:start + batch_size]
            gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
            out.append(self.sample(chunk, negative, gens, steps, guidance, size))
        return np.concatenate(out)

    def run_batch(self, prompts: Sequence[str], negatives: Sequence[str], seeds: Sequence[int], steps: int,
                  guidance: float, scheduler: str, size: int) -> np.ndarray:
        """One denoising batch with explicit per-image seeds and negative prompts (the service's batches, the
        Triton pipeline model's requests): image i from a CPU generator seeded ``seeds[i]``."""
        import torch

        from training.generation import make_scheduler

        f = int(self.facts["vae_scale_factor"])
        if size % f:
            raise ExportError(f"size must be a multiple of {f}, got {size}")
        if scheduler not in self.schedulers:  # one instance per sampler, all from the checkpoint's config
            self.schedulers[scheduler] = make_scheduler(scheduler, self.scheduler.config)
        current, self.scheduler = self.scheduler, self.schedulers[scheduler]
        try:
            gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
            return self.sample(list(prompts), list(negatives), gens, steps, guidance, size)
        finally:
            self.scheduler = current

    # ------------------------------------------------------------------ rewards

    def score_rewards(self, images: np.ndarray, prompts: Sequence[str], findings: Sequence) -> dict[str, np.ndarray]:
        """Every exported reward's scores (N,) for images (N, H, W) in [0, 1] (``Finding`` lists)."""
        import torch

        from training.reward.nets import prepare

        from .graphs import condition_feeds

        x = torch.as_tensor(images, dtype=torch.float32)[:, None] * 2 - 1  # as generation_scorer
        out = {}
        for name, info in self.export.rewards.items():
            size = int(info["image_size"])
            parts = []
            for i in range(0, len(x), self.runner.max_batch):
                xb = x[i:i + self.runner.max_batch]
                img = xb if xb.shape[-1] == size and xb.shape[-2] == size else prepare(xb, size)
                feeds = {"image": img.numpy(), **condition_feeds(
                    info["kind"], prompts[i:i + len(xb)], findings[i:i + len(xb)], int(info.get("text_buckets", 0)))}
                parts.append(self.runner.run(f"rewards/{name}", feeds)["score"].astype(np.float32))
            out[name] = np.concatenate(parts)
        return out

    def scorer(self):
        """``score(images, prompts, findings) -> list[dict]`` as ``training.reward.base.generation_scorer``
        returns, from the exported reward graphs (None when the export has none)."""
        if not self.export.rewards:
            return None
        weights = self.export.manifest.get("combined_weights") or {}

        def score(images, prompts, findings) -> list[dict[str, float]]:
            import torch

            from training.reward.base import combine
            from training.reward.data import parse_findings

            raw = self.score_rewards(images, list(prompts), [parse_findings(f) for f in findings])
            scores = {k: torch.from_numpy(v) for k, v in raw.items()}
            both = combine(scores, weights)
            if both is not None:
                scores["combined"] = both
            return [{k: round(float(v[i]), 6) for k, v in scores.items()} for i in range(len(images))]

        return score
