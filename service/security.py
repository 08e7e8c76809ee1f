"""API keys with roles, request-size limits and log redaction (issue 9, section 6).

Keys come from ``CXRGEN_API_KEYS`` ("key:role,role;key2:role") or from a mounted file named by
``CXRGEN_API_KEYS_FILE`` (one "key role,role [name]" per line, # comments). Roles: ``client``
(generate, augment, models list), ``rater`` (feedback, the rating page's data), ``trainer``
(the feedback stream), ``admin`` (model reload; implies every role). A key is sent as
``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; keys are compared as SHA-256 digests with
``hmac.compare_digest`` against every configured key, so the time taken does not depend on how much
of a key matched or which key it was. With no keys configured the service is open and binds to
localhost only (service.py says so at start-up).

Rate limits (issue 11, section 5): a token bucket per API key (per client address when the service is open
or the key is missing or wrong), sized by the key's role (``CXRGEN_RATE_LIMITS``, see ``parse_limits``).
A request past its bucket gets 429 with ``Retry-After`` and a JSON error naming the limit. Buckets live in
each worker process: with ``CXRGEN_WORKERS=W`` a client whose connections spread over the workers can reach
up to W times the limit (the Kubernetes manifests run one worker per pod, so there the limit is per pod).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import math
import os
import re
import threading
import time
from pathlib import Path

from .web import error

log = logging.getLogger("cxrgen.service")

ROLES = ("client", "rater", "trainer", "admin")
PUBLIC = {"/livez", "/healthz", "/readyz", "/metrics", "/ui", "/docs.json", "/schema.json", "/"}
PUBLIC_PREFIXES = ("/static_content/", "/assets/")

# (method, path regex) -> role. First match wins; anything not listed needs some valid key.
RULES: list[tuple[str, re.Pattern, str]] = [
    ("POST", re.compile(r"^/generate(/png)?$"), "client"),
    ("POST", re.compile(r"^/augment(/.*)?$"), "client"),
    ("GET", re.compile(r"^/augment(/.*)?$"), "client"),
    ("PUT", re.compile(r"^/augment(/.*)?$"), "client"),
    ("GET", re.compile(r"^/models$"), "client"),
    ("POST", re.compile(r"^/models/reload$"), "admin"),
    ("POST", re.compile(r"^/feedback/(rating|comparison)$"), "rater"),
    ("GET", re.compile(r"^/feedback/(queue|criteria)$"), "rater"),
    ("GET", re.compile(r"^/generations/\d+/image\.png$"), "rater"),
    ("GET", re.compile(r"^/feedback/stream$"), "trainer"),
]


class KeyError_(ValueError):
    """A malformed key configuration (named so it does not shadow the builtin)."""


def parse_keys(env: str | None = None, file: str | None = None) -> dict[bytes, tuple[str, frozenset[str]]]:
    """{sha256(key): (name, roles)} from the environment string and / or the file."""
    entries: list[tuple[str, str, list[str]]] = []
    if env:
        for i, part in enumerate(p for p in env.split(";") if p.strip()):
            if ":" not in part:
                raise KeyError_(f"CXRGEN_API_KEYS entry {i + 1}: expected key:role[,role]")
            key, roles = part.strip().rsplit(":", 1)
            entries.append((f"env-{i + 1}", key.strip(), roles.split(",")))
    if file:
        path = Path(file)
        if not path.is_file():
            raise KeyError_(f"CXRGEN_API_KEYS_FILE {file}: no such file")
        for n, line in enumerate(path.read_text().splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) < 2:
                raise KeyError_(f"{file}:{n}: expected 'key role[,role] [name]'")
            entries.append((parts[2] if len(parts) > 2 else f"file-{n}", parts[0], parts[1].split(",")))
    out = {}
    for name, key, roles in entries:
        roles = [r.strip() for r in roles if r.strip()]
        bad = sorted(set(roles) - set(ROLES))
        if bad or not roles:
            raise KeyError_(f"API key {name}: unknown role(s) {bad or roles}; known: {', '.join(ROLES)}")
        if len(key) < 16:
            raise KeyError_(f"API key {name}: too short ({len(key)} characters; use 16 or more)")
        out[hashlib.sha256(key.encode()).digest()] = (name, frozenset(roles))
    return out


def required_role(method: str, path: str) -> str | None:
    """The role a request needs; None for public paths; "any" for paths not listed."""
    if path in PUBLIC or path.startswith(PUBLIC_PREFIXES):
        return None
    for m, rx, role in RULES:
        if m == method and rx.match(path):
            return role
    return "any"


# Requests per second and burst (bucket size) per role; "open" is the per-address bucket of an open service
# (no keys) and of requests without a valid key. A key with several roles gets its most generous role's bucket.
# Generation is bounded by the work budget and the batch queue, so these stop a runaway client or script, not
# normal use: a human rater posts about one rating a second, the rating page a few requests per rating.
DEFAULT_LIMITS: dict[str, tuple[float, float]] = {
    "client": (5.0, 50.0),
    "rater": (20.0, 100.0),
    "trainer": (5.0, 20.0),
    "admin": (20.0, 100.0),
    "open": (20.0, 100.0),
}


def parse_limits(spec: str | None) -> dict[str, tuple[float, float]] | None:
    """``CXRGEN_RATE_LIMITS``: "role=RATE[:BURST],..." (requests per second, bucket size; default burst 10 x
    rate), merged over DEFAULT_LIMITS; unset or empty: the defaults; "off": no rate limiting (None)."""
    if spec is not None and spec.strip().lower() in ("off", "0", "none", "false"):
        return None
    limits = dict(DEFAULT_LIMITS)
    for part in (p.strip() for p in (spec or "").split(",")):
        if not part:
            continue
        role, _, value = part.partition("=")
        role = role.strip()
        if role not in limits:
            raise KeyError_(f"CXRGEN_RATE_LIMITS: unknown role {role!r}; known: {', '.join(limits)}")
        try:
            rate, _, burst = value.partition(":")
            rate = float(rate)
            burst = float(burst) if burst else 10 * rate
        except ValueError:
            raise KeyError_(f"CXRGEN_RATE_LIMITS: {part!r}: expected role=RATE[:BURST] (numbers)") from None
        if not (rate > 0 and burst >= 1) or math.isinf(rate) or math.isinf(burst):
            raise KeyError_(f"CXRGEN_RATE_LIMITS: {part!r}: need RATE > 0 and BURST >= 1")
        limits[role] = (rate, burst)
    return limits


class RateLimiter:
    """Token buckets by identity: each holds up to ``burst`` tokens, refills at ``rate`` per second, and a
    request takes one. Thread-safe (BentoML may call the middleware from several threads)."""

    MAX_BUCKETS = 10_000  # past this, full buckets (idle clients) are dropped: memory stays bounded

    def __init__(self, limits: dict[str, tuple[float, float]], clock=time.monotonic) -> None:
        self.limits = limits
        self.clock = clock
        self.buckets: dict[str, tuple] = {}  # identity -> (tokens, time of last update, rate, burst)
        self.lock = threading.Lock()
        self.prune_at = 0  # the next sweep waits for max(prune_at, MAX_BUCKETS) buckets

    def limit_for(self, roles) -> tuple[str, float, float]:
        """(role, rate, burst): the most generous bucket among ``roles`` ("open" for none)."""
        known = [r for r in roles if r in self.limits] or ["open"]
        role = max(known, key=lambda r: self.limits[r])
        return (role, *self.limits[role])

    def take(self, identity: str, rate: float, burst: float) -> float:
        """0.0 when the request may pass (a token taken), else the seconds until a token is there."""
        now = self.clock()
        with self.lock:
            tokens, last, _, _ = self.buckets.get(identity, (burst, now, rate, burst))
            tokens = min(burst, tokens + (now - last) * rate)
            wait = 0.0 if tokens >= 1.0 else (1.0 - tokens) / rate
            self.buckets[identity] = (tokens - 1.0 if wait == 0.0 else tokens, now, rate, burst)
            if len(self.buckets) > max(self.prune_at, self.MAX_BUCKETS):
                # A bucket that has refilled is the same as no bucket: drop those (idle clients). If most are
                # busy, wait for twice as many before the next sweep, so sweeps stay rare (amortised O(1)).
                self.buckets = {k: v for k, v in self.buckets.items() if v[0] + (now - v[1]) * v[2] < v[3]}
                self.prune_at = 2 * len(self.buckets)
        return wait


def too_many(role: str, scope_name: str, rate: float, burst: float, wait: float):
    """429 with Retry-After (whole seconds, rounded up) and the limit that was hit."""
    from starlette.responses import JSONResponse

    body = {"error": f"rate limit exceeded for {scope_name} ({role} limit: {rate:g} requests/s, burst {burst:g}); "
                     f"retry after {wait:.2f} s", "field": "rate_limit",
            "limit": {"role": role, "rate_per_s": rate, "burst": burst}, "retry_after_s": round(wait, 3)}
    return JSONResponse(body, status_code=429, headers={"Retry-After": str(max(1, math.ceil(wait)))})


class Guard:
    """ASGI middleware: body-size limit (413), API-key roles (401 / 403) and rate limits (429), as JSON
    errors. Public paths (health, metrics, the page, the schema) are never rate limited: probes and Prometheus
    must always get through."""

    def __init__(self, app, keys: dict | None = None, max_body: int = 1_000_000,
                 limits: dict[str, tuple[float, float]] | None | str = "env", clock=time.monotonic,
                 on_limited=None) -> None:
        self.app = app
        self.keys = keys if keys is not None else parse_keys(os.environ.get("CXRGEN_API_KEYS"),
                                                             os.environ.get("CXRGEN_API_KEYS_FILE"))
        self.max_body = max_body
        if limits == "env":
            limits = parse_limits(os.environ.get("CXRGEN_RATE_LIMITS"))
        self.limiter = RateLimiter(limits, clock) if limits else None
        self.on_limited = on_limited  # called with the role whose limit was hit (the metrics counter)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await error(413, f"request body over {self.max_body} bytes", "body")(scope, receive, send)
        role = required_role(scope["method"], scope["path"])
        who = self.identify(headers) if self.keys and role is not None else None
        if self.limiter is not None and role is not None:
            limited = self.rate_limit(scope, who)
            if limited is not None:
                return await limited(scope, receive, send)
        if self.keys:
            if role is not None:
                if who is None:
                    resp = error(401, "missing or unknown API key (send Authorization: Bearer KEY)", "authorization")
                    resp.headers["www-authenticate"] = "Bearer"
                    return await resp(scope, receive, send)
                name, roles = who
                if role != "any" and role not in roles and "admin" not in roles:
                    return await error(403, f"this API key lacks the {role!r} role", "authorization")(scope, receive, send)
                scope.setdefault("state", {})["api_key_name"] = name
        if scope["method"] in ("POST", "PUT", "PATCH"):
            ctype = headers.get("content-type", "application/json").split(";")[0].strip().lower()
            if ctype not in ("application/json", ""):
                return await error(415, f"send the body as application/json, not {ctype[:60]!r}",
                                   "content-type")(scope, receive, send)
            body = await read_body(receive, self.max_body)
            if body is None:
                return await error(413, f"request body over {self.max_body} bytes", "body")(scope, receive, send)
            receive = replay(body, receive)
        return await self.app(scope, receive, send)

    def rate_limit(self, scope, who: tuple[str, frozenset] | None):
        """None when the request may pass, else the 429 response. A valid key is limited by its name; anything
        else (open service, missing or wrong key) by the client's address."""
        if who is not None:
            identity, scope_name = f"key:{who[0]}", f"API key {who[0]!r}"
            role, rate, burst = self.limiter.limit_for(who[1])
        else:
            host = (scope.get("client") or ("unknown", 0))[0]
            identity, scope_name = f"addr:{host}", f"client address {host}"
            role, rate, burst = self.limiter.limit_for(())
        wait = self.limiter.take(identity, rate, burst)
        if wait <= 0:
            return None
        if self.on_limited is not None:
            self.on_limited(role)
        log.warning("rate limited %s (%s limit %g/s, burst %g)", scope_name, role, rate, burst)
        return too_many(role, scope_name, rate, burst, wait)

    def identify(self, headers: dict) -> tuple[str, frozenset] | None:
        auth = headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
        if not key:
            return None
        digest = hashlib.sha256(key.encode()).digest()
        found = None
        for known, who in self.keys.items():  # every key compared: time independent of which matched
            if hmac.compare_digest(digest, known):
                found = who
        return found


async def read_body(receive, limit: int) -> bytes | None:
    """The whole request body (chunked uploads have no Content-Length), or None once it passes ``limit``."""
    chunks, seen = [], 0
    while True:
        msg = await receive()
        if msg["type"] != "http.request":
            break
        chunk = msg.get("body", b"")
        seen += len(chunk)
        if seen > limit:
            return None
        chunks.append(chunk)
        if not msg.get("more_body", False):
            break
    return b"".join(chunks)


def replay(body: bytes, receive):
    """A receive that hands the buffered body over once, then waits on the real one (disconnects)."""
    sent = False

    async def wrapped():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return wrapped


class RedactRequestErrors(logging.Filter):
    """BentoML logs every request-validation error at ERROR with a traceback whose message quotes the
    offending input (a prompt's text). Keep the record, drop the input: the message becomes the error
    locations and types only, and the traceback goes."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            return True
        from pydantic import ValidationError

        if isinstance(exc, ValidationError):
            where = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['type']}" for e in exc.errors())
            record.msg = f"{record.getMessage()}: rejected request ({where})"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


def install_log_redaction() -> None:
    """Attach the filter to the loggers that log request errors (idempotent)."""
    for name in ("bentoml._internal.server.http_app", "_bentoml_impl.server.app", "bentoml", "uvicorn.error"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactRequestErrors) for f in logger.filters):
            logger.addFilter(RedactRequestErrors())
