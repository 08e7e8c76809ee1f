"""Schemathesis over the service's OpenAPI schema: nothing a client can send gives a server error (issue 9).

A separate `bentoml serve` with tiny work budgets, so that the valid requests schemathesis generates
(up to 16 images, 100 steps, 512 px; augmentation batches of 10,000) are refused or cost milliseconds:
what is tested is the handling of input, not the speed of sampling. Schemathesis runs as its CLI
(its pytest plugin does not load under pytest 9).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service_support import KEYS, record_measurement, start_live

ST = Path(sys.executable).parent / "schemathesis"


@pytest.fixture(scope="module")
def fuzz_service(tmp_path_factory):
    live = start_live(tmp_path_factory.mktemp("fuzz"), workers=1, CXRGEN_MAX_WORK=2 * 64 * 64,
                      CXRGEN_MAX_JOB_WORK=2 * 64 * 64, CXRGEN_WARMUP=0)
    yield live
    live.stop()


@pytest.mark.skipif(not ST.exists() and not shutil.which("schemathesis"), reason="schemathesis is not installed")
def test_no_server_errors(fuzz_service, tmp_path):
    cmd = [str(ST) if ST.exists() else "schemathesis", "run", fuzz_service.url + "/docs.json",
           "--checks", "not_a_server_error", "--max-examples", "30", "--request-timeout", "120",
           "-H", f"Authorization: Bearer {KEYS['admin']}", "--suppress-health-check", "all"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=tmp_path)  # its cache folder
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    generated = re.search(r"(\d+) generated", res.stdout)
    assert generated and int(generated.group(1)) > 200, res.stdout[-3000:]  # it really exercised the API
    # Every operation of the schema was fuzzed (with a key that passes every route's role check; the
    # 401 / 403 of each route are tests/test_reliability.py's), none skipped or filtered out.
    schema = httpx.get(fuzz_service.url + "/docs.json", timeout=30).json()
    operations = sum(m in ("get", "post", "put", "patch", "delete") for item in schema["paths"].values() for m in item)
    selected = re.search(r"Selected: (\d+)/(\d+)", res.stdout)
    tested = re.search(r"Tested: (\d+)", res.stdout)
    assert selected and tested, res.stdout[-3000:]
    assert int(selected.group(2)) == int(tested.group(1)) == operations >= 20, res.stdout[-3000:]
    passed = re.search(r"\d+ generated, (\d+) passed", res.stdout)
    record_measurement("fuzz", {"operations": operations, "operations_tested": int(tested.group(1)),
                                "cases": int(generated.group(1)), "cases_passed": int(passed.group(1)) if passed else None,
                                "server_errors": 0, "max_examples": 30, "key_role": "admin"})
    assert fuzz_service.proc.poll() is None  # no crash: the server still runs and is ready
    assert httpx.get(fuzz_service.url + "/readyz").status_code == 200
