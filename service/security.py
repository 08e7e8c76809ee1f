"""API keys with roles, request-size limits and log redaction (issue 9, section 6).

Keys come from ``CXRGEN_API_KEYS`` ("key:role,role;key2:role") or from a mounted file named by
``CXRGEN_API_KEYS_FILE`` (one "key role,role [name]" per line, # comments). Roles: ``client``
(generate, augment, models list), ``rater`` (feedback, the rating page's data), ``trainer``
(the feedback stream), ``admin`` (model reload; implies every role). A key is sent as
``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; keys are compared as SHA-256 digests with
``hmac.compare_digest`` against every configured key, so the time taken does not depend on how much
of a key matched or which key it was. With no keys configured the service is open and binds to
localhost only (service.py says so at start-up).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from pathlib import Path

from .web import error

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


class Guard:
    """ASGI middleware: body-size limit (413) and API-key roles (401 / 403), as JSON errors."""

    def __init__(self, app, keys: dict | None = None, max_body: int = 1_000_000) -> None:
        self.app = app
        self.keys = keys if keys is not None else parse_keys(os.environ.get("CXRGEN_API_KEYS"),
                                                             os.environ.get("CXRGEN_API_KEYS_FILE"))
        self.max_body = max_body

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            return await error(413, f"request body over {self.max_body} bytes", "body")(scope, receive, send)
        if self.keys:
            role = required_role(scope["method"], scope["path"])
            if role is not None:
                who = self.identify(headers)
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
