"""One exported ONNX graph served by onnxruntime inside Triton's python backend (``cxrgen export triton``).

Written as ``<repository>/cxrgen_<graph>/1/model.py`` next to the graph (``model.onnx``). numpy and
onnxruntime are its only imports, so it runs in any Triton python environment. With dynamic batching
Triton hands ``execute`` several requests: those whose tensors agree on every axis but the batch are
concatenated into one onnxruntime call and the outputs split back (a U-Net request of another latent
size runs on its own).

Tensors cross the backend as DLPack (``np.from_dlpack`` / ``Tensor.from_dlpack``), not ``as_numpy`` /
``Tensor(name, array)``: the python-backend stub bundled with nvidia-pytriton 0.7.0 was compiled against
numpy 1's C ABI and, under numpy 2, reads every array's item size wrong (inputs arrive as zeros, outputs
leave empty; BYTES tensors crash the stub). DLPack involves no numpy C structs, so it is right with both.

Batch-only tensors (the U-Net's ``timestep``, the ACE text encoder's ``conditional``, a reward's
``score``) are rank 1 in the graph; Triton's config gives them dims [1], so they travel as (N, 1)
and are reshaped here (the onnxruntime platform variant does the same with ``reshape: { shape: [ ] }``).
"""

from __future__ import annotations

import json
import os
import sys
from collections import defaultdict

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def quiet_dlpack_capsules() -> None:
    """numpy's DLPack capsule destructor cannot read a capsule the stub has consumed and renamed, and reports a
    harmless ValueError through ``sys.unraisablehook`` for every output tensor; drop exactly that report."""
    previous = sys.unraisablehook

    def hook(unraisable):
        if isinstance(unraisable.exc_value, ValueError) and "PyCapsule_GetPointer" in str(unraisable.exc_value):
            return
        previous(unraisable)

    sys.unraisablehook = hook


def as_array(tensor) -> np.ndarray:
    """A pb_utils.Tensor as a numpy array (a view of Triton's memory: copy what outlives the request)."""
    return np.from_dlpack(tensor)


def to_tensor(name: str, array: np.ndarray):
    return pb_utils.Tensor.from_dlpack(name, np.ascontiguousarray(array))


def session(path: str, kind: str, device_id: str) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = int(os.environ.get("CXRGEN_TRITON_THREADS", "0")) or len(os.sched_getaffinity(0))
    opts.intra_op_num_threads = threads
    opts.add_session_config_entry("session.intra_op.allow_spinning", os.environ.get("CXRGEN_ORT_SPIN", "0"))
    opts.log_severity_level = 3
    if kind == "GPU":
        providers = [("CUDAExecutionProvider", {"device_id": int(device_id)}), "CPUExecutionProvider"]
    else:
        providers = ["CPUExecutionProvider"]
    return ort.InferenceSession(path, opts, providers=providers)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        quiet_dlpack_capsules()
        config = json.loads(args["model_config"])
        folder = os.path.join(args["model_repository"], args["model_version"])
        self.session = session(os.path.join(folder, "model.onnx"), args["model_instance_kind"],
                               args["model_instance_device_id"])
        self.inputs = {i.name: len(i.shape) for i in self.session.get_inputs()}  # name -> graph rank
        self.outputs = {o.name: len(o.shape) for o in self.session.get_outputs()}
        declared = {i["name"] for i in config["input"]}
        if declared != set(self.inputs):
            raise pb_utils.TritonModelException(f"config inputs {sorted(declared)} are not the graph's "
                                                f"{sorted(self.inputs)}")

    def execute(self, requests):
        responses: list = [None] * len(requests)
        groups: dict = defaultdict(list)  # same non-batch shapes -> one onnxruntime call
        for i, request in enumerate(requests):
            try:
                feeds = {name: as_array(pb_utils.get_input_tensor_by_name(request, name)) for name in self.inputs}
                key = tuple((n, a.shape[1:], a.dtype.str) for n, a in sorted(feeds.items()))
                groups[key].append((i, feeds))
            except Exception as e:  # a malformed request fails alone
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(e).__name__}: {e}"))
        for members in groups.values():
            self.run_group(members, responses)
        return responses

    def run_group(self, members: list, responses: list) -> None:
        sizes = [len(next(iter(feeds.values()))) for _, feeds in members]
        feeds = {name: np.concatenate([f[name] for _, f in members]) for name in self.inputs}
        feeds = {name: a.reshape(-1) if self.inputs[name] == 1 else a for name, a in feeds.items()}
        try:
            names = list(self.outputs)
            outs = dict(zip(names, self.session.run(names, feeds)))
        except Exception as e:  # onnxruntime's own error types: the message says what was wrong
            for i, _ in members:
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"onnxruntime: {e}"))
            return
        start = 0
        for (i, _), n in zip(members, sizes):
            tensors = [to_tensor(name, a[start:start + n].reshape(n, 1) if self.outputs[name] == 1
                                 else a[start:start + n]) for name, a in outs.items()]
            responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
            start += n
