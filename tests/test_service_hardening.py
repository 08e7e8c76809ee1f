"""Hardening (issue 11, section 5): per-key rate limits, the augmentation job budget, the dependency audit.

The rate limiter is tested as the ASGI middleware it is (service.security.Guard around a stub app, with a
clock the test moves); tests/test_service_e2e.py checks that CXRGEN_RATE_LIMITS reaches a real server.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
from starlette.responses import PlainTextResponse
from starlette.testclient import TestClient

from service.security import DEFAULT_LIMITS, Guard, KeyError_, RateLimiter, parse_keys, parse_limits
from service_support import KEYS_ENV, REPO, auth


async def _ok(scope, receive, send):
    await PlainTextResponse("ok")(scope, receive, send)


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _guarded(limits, keys=True):
    clock, hits = Clock(), []
    app = Guard(_ok, keys=parse_keys(KEYS_ENV) if keys else {}, limits=limits, clock=clock, on_limited=hits.append)
    return TestClient(app), clock, hits


def test_limits_parse_merge_and_refuse_nonsense():
    assert parse_limits(None) == DEFAULT_LIMITS and parse_limits("") == DEFAULT_LIMITS
    assert parse_limits("off") is None
    got = parse_limits("client=1:3, rater=0.5")
    assert got["client"] == (1.0, 3.0) and got["rater"] == (0.5, 5.0) and got["admin"] == DEFAULT_LIMITS["admin"]
    for bad, says in (("dragon=1", "unknown role 'dragon'"), ("client=fast", "expected role=RATE"),
                      ("client=0", "RATE > 0"), ("client=1:0.5", "BURST >= 1")):
        with pytest.raises(KeyError_, match=says):
            parse_limits(bad)


def test_a_key_over_its_limit_gets_429_with_retry_after_and_the_limit():
    client, clock, hits = _guarded(parse_limits("client=1:2"))
    h = auth("client")
    assert [client.post("/generate", headers=h, json={}).status_code for _ in range(2)] == [200, 200]
    r = client.post("/generate", headers=h, json={})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    body = r.json()
    assert body["field"] == "rate_limit" and body["limit"] == {"role": "client", "rate_per_s": 1.0, "burst": 2.0}
    assert "API key 'env-1'" in body["error"] and 0 < body["retry_after_s"] <= 1
    assert hits == ["client"]
    # Other keys have their own buckets; health and metrics are never limited.
    assert client.post("/feedback/rating", headers=auth("rater"), json={}).status_code == 200
    assert all(client.get(p).status_code == 200 for p in ("/readyz", "/livez", "/metrics") * 20)
    # The bucket refills at the rate: one more request a second.
    clock.t += 1.0
    assert client.post("/generate", headers=h, json={}).status_code == 200
    assert client.post("/generate", headers=h, json={}).status_code == 429
    clock.t += 10.0  # never more than the burst
    assert [client.post("/generate", headers=h, json={}).status_code for _ in range(3)] == [200, 200, 429]


def test_a_key_with_several_roles_gets_its_most_generous_bucket():
    limiter = RateLimiter(parse_limits("client=1:2,admin=50:100"))
    assert limiter.limit_for(frozenset({"client", "admin"})) == ("admin", 50.0, 100.0)
    assert limiter.limit_for(()) == ("open", *DEFAULT_LIMITS["open"])


def test_requests_without_a_valid_key_are_limited_by_address_before_the_401():
    client, _, hits = _guarded(parse_limits("open=1:3"))
    codes = [client.get("/models", headers={"Authorization": "Bearer wrong-key-wrong-key-0"}).status_code
             for _ in range(4)]
    assert codes == [401, 401, 401, 429] and hits == ["open"]
    r = client.get("/models")
    assert r.status_code == 429 and "client address" in r.json()["error"]
    assert client.get("/models", headers=auth("client")).status_code == 200  # a valid key: its own bucket


def test_an_open_service_limits_each_client_address():
    app = Guard(_ok, keys={}, limits=parse_limits("open=1:2"), clock=Clock())
    a = TestClient(app, client=("10.0.0.1", 5000))
    b = TestClient(app, client=("10.0.0.2", 5000))
    assert [a.get("/models").status_code for _ in range(3)] == [200, 200, 429]
    assert b.get("/models").status_code == 200


def test_rate_limits_off():
    client, _, _ = _guarded(None)
    assert all(client.post("/generate", headers=auth("client"), json={}).status_code == 200 for _ in range(200))


def test_idle_buckets_are_dropped_so_memory_stays_bounded():
    clock = Clock()
    limiter = RateLimiter(parse_limits("open=1:2"), clock)
    limiter.MAX_BUCKETS = 100
    for i in range(150):
        limiter.take(f"addr:{i}", 1.0, 2.0)
        clock.t += 0.5
    assert len(limiter.buckets) <= 101


def test_malformed_rate_limits_stop_the_service_at_start(tmp_path):
    import subprocess
    import sys

    code = "import service.service"
    env = {"CXRGEN_RATE_LIMITS": "client=lots", "CXRGEN_DATA": str(tmp_path), "PATH": "/usr/bin:/bin",
           "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "CXRGEN_RATE_LIMITS" in res.stderr and "client=lots" in res.stderr


# ---------------------------------------------------------------- work budgets


def test_augment_job_budget_gives_429_while_the_slots_are_taken(service_app, monkeypatch):
    """CXRGEN_MAX_JOBS: a submit while that many batches are queued or running gets 429 (with Retry-After),
    and a job whose row stopped moving long ago (its server died on another host) does not hold a slot."""
    import service.service as svc
    from service.web import RUNTIME

    monkeypatch.setattr(svc.CFG, "max_active_jobs", 1)
    jobs = RUNTIME["jobs"]
    blocker = jobs.create("augment", {"count": 1}, 1, "budget-test-blocker")
    try:
        body = {"count": 2, "labels": {"edema": 1}, "steps": 1, "size": 64}
        r = service_app.post("/augment", json=body, headers=auth("client"))
        assert r.status_code == 429 and r.headers["retry-after"] == "60", r.text
        assert r.json()["limit"] == {"max_active_jobs": 1} and "CXRGEN_MAX_JOBS" in r.json()["error"]
        monkeypatch.setattr(svc, "JOB_STALE_S", -3600)  # every row counts as stale
        assert svc._active_jobs() == 0
    finally:
        jobs.fail(blocker.id, "test over")


def test_every_request_field_is_bounded():
    """Every string, list, map and number a client sends has a bound (length, count, maximum), so neither the
    body limit nor the work budgets are the only guard (walks each request model's JSON schema)."""
    from service.schemas import AugmentRequest, ComparisonIn, GenerateRequest, PngRequest, RatingIn, ReloadRequest

    def walk(node, defs, where, out):
        if "$ref" in node:
            return walk(defs[node["$ref"].split("/")[-1]], defs, where, out)
        for key in ("anyOf", "allOf", "oneOf"):
            for sub in node.get(key, []):
                walk(sub, defs, where, out)
        if "enum" in node or "const" in node:
            return
        kind = node.get("type")
        need = {"string": "maxLength", "array": "maxItems", "integer": "maximum", "number": "maximum"}.get(kind)
        if need and need not in node:
            out.append(f"{where}: {kind} without {need}")
        if kind == "array":
            walk(node.get("items", {}), defs, where + "[]", out)
        if kind == "object":
            for name, sub in node.get("properties", {}).items():
                walk(sub, defs, f"{where}.{name}", out)
            extra = node.get("additionalProperties")
            if isinstance(extra, dict):
                if "maxProperties" not in node:
                    out.append(f"{where}: map without maxProperties")
                walk(extra, defs, where + "{}", out)
                if "propertyNames" in node:
                    walk(node["propertyNames"], defs, where + "{key}", out)
        return out

    for model in (GenerateRequest, PngRequest, RatingIn, ComparisonIn, AugmentRequest, ReloadRequest):
        schema = model.model_json_schema()
        assert walk(schema, schema.get("$defs", {}), model.__name__, []) == []


# ---------------------------------------------------------------- dependency audit


def _audit():
    spec = importlib.util.spec_from_file_location("ci_audit", REPO / ".ci" / "audit.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_audit_fails_on_a_fixable_vulnerability_only():
    audit = _audit()
    report = {"dependencies": [
        {"name": "jinja2", "version": "3.1.2", "vulns": [{"id": "GHSA-h5c8-rqwp-cp95", "fix_versions": ["3.1.3"],
                                                         "aliases": ["CVE-2024-22195"], "description": "xss"}]},
        {"name": "nofix", "version": "1.0", "vulns": [{"id": "PYSEC-0000-1", "fix_versions": [], "aliases": []}]},
        {"name": "numpy", "version": "2.4.6", "vulns": []},
        {"name": "private-pkg", "skip_reason": "Dependency not found on PyPI and could not be audited"}]}
    verdict = audit.judge(report, ignored={})
    assert [v["id"] for v in verdict["fixable"]] == ["GHSA-h5c8-rqwp-cp95"]
    assert [v["id"] for v in verdict["unfixable"]] == ["PYSEC-0000-1"]
    assert verdict["audited"] == 3 and verdict["skipped"] == ["private-pkg"]
    assert audit.exit_code(verdict) == 1
    # An ignore needs a reason, and an alias (CVE id) works as well as the advisory id.
    verdict = audit.judge(report, ignored={"CVE-2024-22195": "not reachable: we never render untrusted templates"})
    assert verdict["fixable"] == [] and audit.exit_code(verdict) == 0
    with pytest.raises(ValueError, match="reason"):
        audit.check_ignores({"GHSA-x": ""})


def test_audit_pin_is_in_the_dev_extra():
    import tomllib

    dev = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["dev"]
    assert any(d.startswith("pip-audit==") for d in dev)
    assert "make audit" in (REPO / ".ci" / "run").read_text() or "audit.py" in (REPO / ".ci" / "run").read_text()
    assert json.loads(json.dumps(_audit().IGNORED)) == _audit().IGNORED  # plain data, each with its reason
    _audit().check_ignores(_audit().IGNORED)
