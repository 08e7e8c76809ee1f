"""cxrgen's Prometheus series (issue 9, section 4), with prometheus_client directly.

BentoML serves ``/metrics`` from prometheus_client's multiprocess collector when it runs several
workers (it sets ``PROMETHEUS_MULTIPROC_DIR`` per server). Series must therefore be created after
that variable is set, inside the worker, which is why they are built by ``Metrics()`` at service
start-up and never at import (``bentoml.metrics`` is deprecated, and importing it loaded
prometheus_client too early: BentoML issue 5056). Gauges say how workers combine
(``multiprocess_mode``). GPU series come from NVML (nvidia-ml-py) and exist only where a GPU does.
"""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("cxrgen.service")
_LOCK = threading.Lock()
_INSTANCE: "Metrics | None" = None

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)
SCORE_BUCKETS = tuple(i / 10 for i in range(1, 11))


def metrics() -> "Metrics":
    """The process's one Metrics (series cannot be registered twice in a registry)."""
    global _INSTANCE
    with _LOCK:
        if _INSTANCE is None:
            _INSTANCE = Metrics()
        return _INSTANCE


class Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.images = Counter("cxrgen_images_generated_total", "Images generated", ["endpoint"])
        self.generation_seconds = Histogram(
            "cxrgen_generation_seconds", "Wall time of one denoising batch (sampling and decoding)",
            ["size", "backend"], buckets=LATENCY_BUCKETS)
        self.batch_size = Histogram("cxrgen_batch_size", "Images per denoising batch", buckets=(1, 2, 4, 8, 16, 32))
        self.queue = Gauge("cxrgen_queue_depth", "Images waiting for the batch worker", multiprocess_mode="livesum")
        self.score = Histogram("cxrgen_reward_score", "Reward scores of served images", ["reward"],
                               buckets=SCORE_BUCKETS)
        self.feedback = Counter("cxrgen_feedback_received_total", "Feedback records accepted", ["kind"])
        self.model_info = Gauge("cxrgen_model_info", "The generator version being served (1 = serving)",
                                ["version"], multiprocess_mode="livemax")
        self.jobs = Counter("cxrgen_augment_jobs_total", "Augmentation jobs by final state", ["state"])
        self.rate_limited = Counter("cxrgen_rate_limited_total", "Requests refused with 429 by the per-key rate "
                                    "limit, by the role whose limit was hit", ["role"])
        self._gpu = None
        self._gpu_thread = None
        # Every labelled series exists from the start (at 0), so dashboards and alerts see it before it moves.
        for endpoint in ("generate", "generate_png", "augment"):
            self.images.labels(endpoint)
        for kind in ("rating", "comparison"):
            self.feedback.labels(kind)
        for state in ("done", "failed"):
            self.jobs.labels(state)
        for role in ("client", "rater", "trainer", "admin", "open"):
            self.rate_limited.labels(role)

    # called by the engine and the endpoints
    def batch(self, n: int, seconds: float, size: int, backend: str) -> None:
        self.batch_size.observe(n)
        self.generation_seconds.labels(str(size), backend).observe(seconds)

    def generated(self, n: int, endpoint: str) -> None:
        self.images.labels(endpoint).inc(n)

    def queue_depth(self, n: int) -> None:
        self.queue.set(n)

    def scores(self, scores: dict) -> None:
        for name, v in scores.items():
            self.score.labels(name).observe(float(v))

    def feedback_received(self, kind: str) -> None:
        self.feedback.labels(kind).inc()

    def model_loaded(self, version: str, previous: str | None) -> None:
        if previous and previous != version:
            self.model_info.labels(previous).set(0)
        self.model_info.labels(version).set(1)

    def job_finished(self, state: str) -> None:
        self.jobs.labels(state).inc()

    def limited(self, role: str) -> None:
        self.rate_limited.labels(role).inc()

    # GPU
    def start_gpu(self, interval_s: float = 5.0) -> bool:
        """Sample NVML every ``interval_s`` into gauges; False (and no GPU series) without a GPU."""
        try:
            import pynvml

            pynvml.nvmlInit()
            count = pynvml.nvmlDeviceGetCount()
        except Exception as e:  # no driver, no library, no device: the series stay absent
            log.info("no NVIDIA GPU visible (%s): GPU metrics off", type(e).__name__)
            return False
        if count == 0:
            return False
        from prometheus_client import Gauge

        mode = {"multiprocess_mode": "mostrecent"}
        self._gpu = {
            "util": Gauge("cxrgen_gpu_utilization_percent", "GPU utilisation (NVML)", ["gpu"], **mode),
            "mem": Gauge("cxrgen_gpu_memory_used_bytes", "GPU memory in use (NVML)", ["gpu"], **mode),
            "mem_total": Gauge("cxrgen_gpu_memory_total_bytes", "GPU memory (NVML)", ["gpu"], **mode),
            "power": Gauge("cxrgen_gpu_power_watts", "GPU power draw (NVML)", ["gpu"], **mode),
            "sm_clock": Gauge("cxrgen_gpu_sm_clock_mhz", "GPU SM clock (NVML)", ["gpu"], **mode),
        }
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]

        def sample() -> None:
            for i, h in enumerate(handles):
                g = str(i)
                self._gpu["util"].labels(g).set(pynvml.nvmlDeviceGetUtilizationRates(h).gpu)
                mem = pynvml.nvmlDeviceGetMemoryInfo(h)
                self._gpu["mem"].labels(g).set(mem.used)
                self._gpu["mem_total"].labels(g).set(mem.total)
                self._gpu["power"].labels(g).set(pynvml.nvmlDeviceGetPowerUsage(h) / 1000)
                self._gpu["sm_clock"].labels(g).set(pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM))

        def loop() -> None:
            while True:
                try:
                    sample()
                except Exception as e:  # a transient NVML error must not kill the thread
                    log.warning("NVML sample failed: %s", e)
                threading.Event().wait(interval_s)

        sample()
        self._gpu_thread = threading.Thread(target=loop, name="cxrgen-nvml", daemon=True)
        self._gpu_thread.start()
        return True
