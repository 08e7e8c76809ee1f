"""A real Prometheus scrapes a real server (issue 11, section 3).

Debian's `prometheus` binary (the package .ci/run installs for promtool) with a one-second scrape interval,
a temporary TSDB and a free loopback port scrapes the session's two-worker `bentoml serve` (its /metrics
needs no key). After a few generations the test asks Prometheus' HTTP API for cxrgen's series. Bounded:
about 10-20 s.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time

import httpx
import pytest

from service_support import DEFAULT_VERSION, free_port

PROMETHEUS = shutil.which("prometheus")


@pytest.fixture
def prometheus(live_service, tmp_path):
    if PROMETHEUS is None:
        pytest.skip("no prometheus binary: install Debian's prometheus package (.ci/run does)")
    target = live_service.url.removeprefix("http://")
    (tmp_path / "prometheus.yml").write_text(f"""
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: cxrgen
    metrics_path: /metrics
    static_configs:
      - targets: ["{target}"]
""")
    port = free_port()
    log = open(tmp_path / "prometheus.log", "wb")
    proc = subprocess.Popen([PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _until(lambda: httpx.get(url + "/-/ready", timeout=5).status_code == 200, 30, "Prometheus ready", tmp_path)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _until(check, timeout: float, what: str, logs=None):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if check():
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    tail = (logs / "prometheus.log").read_text()[-3000:] if logs else ""
    raise AssertionError(f"{what}: not within {timeout:.0f} s\n{tail}")


def _query(url: str, promql: str) -> list[dict]:
    r = httpx.get(url + "/api/v1/query", params={"query": promql}, timeout=10)
    assert r.status_code == 200 and r.json()["status"] == "success", r.text
    return r.json()["data"]["result"]


def _value(url: str, promql: str) -> float | None:
    result = _query(url, promql)
    return float(result[0]["value"][1]) if result else None


def _images_now(live) -> float:
    text = httpx.get(live.url + "/metrics", timeout=30).text
    return sum(float(v) for v in re.findall(r"^cxrgen_images_generated_total\{[^}]*\} (\S+)$", text, re.M))


def test_prometheus_scrapes_cxrgen_series_with_sane_values(live_service, prometheus):
    url = prometheus
    before = _images_now(live_service)
    with live_service.client("client") as c:
        for seed in (1, 2):
            r = c.post("/generate", json={"prompt": "Moderate cardiomegaly.", "n": 2, "seed": seed, "steps": 2})
            assert r.status_code == 200, r.text
    want = before + 4
    _until(lambda: (_value(url, "sum(cxrgen_images_generated_total)") or 0) >= want, 30,
           f"sum(cxrgen_images_generated_total) >= {want} in Prometheus")
    # The target is up, and every series cxrgen exports arrived with a plausible value.
    assert _value(url, 'up{job="cxrgen"}') == 1.0
    assert _value(url, 'sum(cxrgen_images_generated_total{endpoint="generate"})') >= 4
    assert _value(url, "sum(cxrgen_generation_seconds_count)") > 0
    assert _value(url, "sum(cxrgen_generation_seconds_sum)") > 0
    p95 = _value(url, "histogram_quantile(0.95, sum by (le) (cxrgen_generation_seconds_bucket))")
    assert p95 is not None and 0 < p95 <= 128, p95  # within the histogram's buckets, not NaN / +Inf
    assert _value(url, "sum(cxrgen_batch_size_count)") > 0
    assert _value(url, "sum(cxrgen_batch_size_sum) / sum(cxrgen_batch_size_count)") >= 1
    scores = _query(url, "cxrgen_reward_score_count")
    assert {s["metric"]["reward"] for s in scores} >= {"plausibility", "combined"}
    assert all(0 <= float(s["value"][1]) for s in scores)
    mean = _value(url, 'sum(cxrgen_reward_score_sum{reward="combined"}) / sum(cxrgen_reward_score_count{reward="combined"})')
    assert 0 <= mean <= 1, mean
    model = _query(url, "cxrgen_model_info == 1")
    assert [m["metric"]["version"] for m in model] == [DEFAULT_VERSION], model
    assert _value(url, "sum(cxrgen_queue_depth)") >= 0
    assert _query(url, "cxrgen_feedback_received_total") and _query(url, "cxrgen_augment_jobs_total")
    assert _query(url, "cxrgen_rate_limited_total")
    # BentoML's own request metrics (the alert rules' error rate and latency read these).
    assert _query(url, '{__name__=~"bentoml_(service|api_server)_request_total"}')
