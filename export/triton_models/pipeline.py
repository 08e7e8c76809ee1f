"""The whole text -> image pipeline as one Triton model (python backend, Business Logic Scripting).

Written as ``<repository>/cxrgen_pipeline/1/model.py`` by ``cxrgen export triton``, beside ``export/``
(the export folder's manifest, tokenizer and scheduler config). It runs ``export.pipeline.GraphPipeline``,
the same sampling loop as the onnxruntime and TensorRT backends, with a runner whose three graphs are BLS
requests to the repository's component models (``pb_utils.InferenceRequest(...).exec()``): the same seed
gives the same image as every other backend. It needs cxrgen (torch, diffusers, transformers) in the
server's python environment.

One request: per image (row) ``prompt`` and ``negative_prompt`` (UTF-8 bytes, UINT8, zero-padded; not BYTES:
see ``component.py`` on the bundled stub and numpy 2), ``seed``, ``steps``, ``guidance``, ``size`` and
``scheduler`` (UTF-8, a ``training.generation.SCHEDULERS`` name); the answer is ``image`` (N, size, size),
grey in [0, 1]. With dynamic batching, rows of all queued requests that share (steps, guidance, scheduler,
size) run as one denoising batch, up to the model's max_batch_size images.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from export.folder import read_export
from export.pipeline import GraphPipeline
from export.triton import decode_texts, from_wire, model_name, to_wire
from export.triton_models.component import as_array, quiet_dlpack_capsules, to_tensor

ROW_INPUTS = ("prompt", "negative_prompt", "seed", "steps", "guidance", "size", "scheduler")


class BlsRunner:
    """``runner.run(graph, feeds)`` as a BLS request to the component model serving ``graph``."""

    def __init__(self, export, max_batch: int) -> None:
        self.export, self.max_batch = export, max_batch

    def graph(self, name: str) -> dict:
        return self.export.rewards[name.split("/", 1)[1]] if name.startswith("rewards/") else self.export.graph(name)

    def run(self, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        entry = self.graph(name)
        wanted = [o["name"] for o in entry["outputs"]]
        request = pb_utils.InferenceRequest(
            model_name=model_name(name), requested_output_names=wanted,
            inputs=[to_tensor(k, v) for k, v in to_wire(feeds, entry).items()])
        response = request.exec()
        if response.has_error():
            raise RuntimeError(f"{model_name(name)}: {response.error().message()}")
        # copies: the arrays outlive the response whose memory they view
        outs = {o: as_array(pb_utils.get_output_tensor_by_name(response, o)).copy() for o in wanted}
        return from_wire(outs, entry)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        quiet_dlpack_capsules()
        from diffusers.utils import logging as diffusers_logging

        diffusers_logging.set_verbosity_error()  # prompt text stays out of the server log
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        folder = Path(args["model_repository"]) / args["model_version"] / "export"
        export = read_export(folder, graph_files=False)
        self.pipe = GraphPipeline(export, BlsRunner(export, int(params["component_max_batch"])), "triton")
        self.max_batch = int(config["max_batch_size"])

    def execute(self, requests):
        responses: list = [None] * len(requests)
        groups: dict = defaultdict(list)  # (steps, guidance, scheduler, size) -> [(request index, row)]
        rows: dict = {}
        for i, request in enumerate(requests):
            try:
                rows[i] = self.read(request)
            except Exception as e:
                responses[i] = error(f"bad request: {e}")
                continue
            for r, row in enumerate(rows[i]):
                groups[row["settings"]].append((i, r))
        images: dict = {}
        failed: dict = {}
        for settings, members in groups.items():
            for start in range(0, len(members), self.max_batch):
                chunk = members[start:start + self.max_batch]
                picked = [rows[i][r] for i, r in chunk]
                try:
                    out = self.pipe.run_batch([p["prompt"] for p in picked], [p["negative"] for p in picked],
                                              [p["seed"] for p in picked], *settings)
                except Exception as e:  # unknown scheduler, bad size, a component model's error
                    for i, _ in chunk:
                        failed[i] = f"{type(e).__name__}: {e}"
                    continue
                for (i, r), img in zip(chunk, out):
                    images[(i, r)] = img
        for i, request_rows in rows.items():
            if i in failed:
                responses[i] = error(failed[i])
            else:
                stack = np.stack([images[(i, r)] for r in range(len(request_rows))]).astype(np.float32)
                responses[i] = pb_utils.InferenceResponse(output_tensors=[to_tensor("image", stack)])
        return responses

    @staticmethod
    def read(request) -> list[dict]:
        """The request's rows: {"prompt", "negative", "seed", "settings": (steps, guidance, scheduler, size)}."""
        t = {}
        for name in ROW_INPUTS:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"input {name!r} is missing")
            t[name] = as_array(tensor)
        n = len(t["seed"])
        if any(len(a) != n for a in t.values()):
            raise ValueError("every input needs one row per image: " + ", ".join(f"{k} {len(a)}" for k, a in t.items()))
        prompts, negatives, schedulers = (decode_texts(t[k]) for k in ("prompt", "negative_prompt", "scheduler"))
        out = []
        for r in range(n):
            steps, size = int(t["steps"][r, 0]), int(t["size"][r, 0])
            guidance = float(t["guidance"][r, 0])
            if not 1 <= steps <= 1000:
                raise ValueError(f"steps must be in [1, 1000], got {steps}")
            if not 8 <= size <= 2048:
                raise ValueError(f"size must be in [8, 2048], got {size}")
            if not np.isfinite(guidance) or guidance < 0:
                raise ValueError(f"guidance must be >= 0, got {guidance}")
            out.append({"prompt": prompts[r], "negative": negatives[r], "seed": int(t["seed"][r, 0]),
                        "settings": (steps, guidance, schedulers[r], size)})
        return out


def error(message: str):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
