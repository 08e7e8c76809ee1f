"""Export and acceleration (issue 10): ONNX graphs, onnxruntime, TensorRT and Triton backends.

Dependencies point one way (DESIGN.md): ``service -> export -> training``; nothing in
``training`` imports this package. It plugs into the CLI and into ``cxrgen generate``
through the ``cxrgen.commands`` and ``cxrgen.backends`` entry points (pyproject.toml).
Heavy imports (torch, onnx, onnxruntime, tensorrt) stay inside functions.
"""
