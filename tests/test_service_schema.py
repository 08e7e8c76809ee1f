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

import pytest

from service_support import KEYS, start_live

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
