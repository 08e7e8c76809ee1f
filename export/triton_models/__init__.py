"""Triton python-backend models (issue 10, section 4), copied into a repository by ``cxrgen export triton``.

``component.py`` serves one ONNX graph with onnxruntime (numpy and onnxruntime only: it runs in any Triton
python environment); ``pipeline.py`` is the sampling loop of ``export/pipeline.py`` driving the component
models through BLS (it needs cxrgen installed in the server's python environment). Both import
``triton_python_backend_utils``, which exists only inside Triton's python-backend stub: nothing imports
these modules outside a server.
"""
