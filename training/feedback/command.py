"""``cxrgen store`` (upgrade, stats) and ``cxrgen feedback`` (export, import): issue 7, section 1.

Store URLs are printed only with the password masked. SQLAlchemy and the store load inside the
commands, so ``cxrgen --help`` stays fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

STORE_HELP = ("store URL: sqlite:///path.db or postgresql+psycopg://user@host/db (a plain path means SQLite); "
              "default $CXRGEN_STORE, else sqlite:///feedback/store.db")
BLOBS_HELP = "image folder; default $CXRGEN_BLOBS, else blobs/ next to the SQLite file (PostgreSQL: feedback/blobs)"


def _store_args(p: argparse.ArgumentParser, blobs: bool = True) -> None:
    p.add_argument("--store", default=None, metavar="URL", help=STORE_HELP)
    if blobs:
        p.add_argument("--blobs", default=None, metavar="DIR", help=BLOBS_HELP)


def register_store(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("store", help="feedback store administration: upgrade the schema, print counts",
                       description="Administer the feedback store (SQLite file or PostgreSQL database).")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    up = actions.add_parser("upgrade", help="create the store or migrate it to the newest schema (Alembic)",
                            description="Create the store's tables or migrate them to the newest schema; "
                                        "safe to run again. Prints the store URL (password masked) and revision.")
    _store_args(up, blobs=False)
    up.set_defaults(func=run_upgrade)
    st = actions.add_parser("stats", help="print record counts and the current cursor as JSON",
                            description="Print the store's record counts, feed cursor and schema revision as JSON.")
    _store_args(st)
    st.set_defaults(func=run_stats)


def register_feedback(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("feedback", help="export / import feedback as NDJSON (moves feedback between stores)",
                       description="Move feedback between stores and machines as NDJSON, one event per line.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    ex = actions.add_parser("export", help="write every event after a cursor as NDJSON",
                            description="Write every event with seq > --after as NDJSON (seq, kind, record; "
                                        "generations carry their PNG as base64 unless --no-images) to --out "
                                        "(default: stdout). Prints the final cursor as JSON (on stderr when "
                                        "the events go to stdout); pass it as --after next time.")
    _store_args(ex)
    ex.add_argument("--after", type=int, default=0, metavar="C", help="cursor: export events with seq > C")
    ex.add_argument("--out", default="-", metavar="FILE", help="output file, or - for stdout (default)")
    ex.add_argument("--no-images", action="store_true", help="leave the images out (the target has them)")
    ex.set_defaults(func=run_export)
    im = actions.add_parser("import", help="read an NDJSON export into this store (idempotent)",
                            description="Replay an export into this store (created and migrated if needed). "
                                        "Records keep their idempotency keys, so importing twice adds nothing. "
                                        "Prints the events read and the store's cursor as JSON.")
    im.add_argument("file", metavar="FILE",
                    help="NDJSON export, - for stdin, or a service URL: http://HOST:3000 (reads its "
                         "/feedback/stream; the API key from $CXRGEN_API_KEY)")
    im.add_argument("--after", type=int, default=0, metavar="C",
                    help="with a URL: stream only events after cursor C (the cursor the last import printed)")
    _store_args(im)
    im.set_defaults(func=run_import)


def _open(args, upgrade: bool):
    from . import db
    from .store import open_store

    url = db.resolve_url(args.store)
    if not upgrade and url.get_backend_name() == "sqlite" and not Path(url.database).is_file():
        raise FileNotFoundError(f"no store at {url.database}; run `cxrgen store upgrade --store {db.safe_url(url)}` "
                                "or pass --store")
    return open_store(url, getattr(args, "blobs", None), upgrade=upgrade)


def run_upgrade(args) -> int:
    from . import db

    store = _open(args, upgrade=True)
    with store:
        print(json.dumps({"store": db.safe_url(store.url), "revision": db.current_revision(store.engine)}))
    return 0


def run_stats(args) -> int:
    from . import db

    with _open(args, upgrade=False) as store:
        print(json.dumps({"store": db.safe_url(store.url), "blobs": str(store.blobs.root),
                          "revision": db.current_revision(store.engine), **store.counts(),
                          "cursor": store.cursor()}))
    return 0


def run_export(args) -> int:
    from .exchange import export_events

    if args.after < 0:
        raise ValueError(f"--after must be >= 0, got {args.after}")
    with _open(args, upgrade=False) as store:
        if args.out == "-":
            n, cursor = export_events(store, sys.stdout, args.after, images=not args.no_images)
            print(json.dumps({"events": n, "cursor": cursor}), file=sys.stderr)
            return 0
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        with open(tmp, "w") as f:
            n, cursor = export_events(store, f, args.after, images=not args.no_images)
        os.replace(tmp, out)
    print(json.dumps({"events": n, "cursor": cursor, "out": str(out)}))
    return 0


def run_import(args) -> int:
    from .exchange import import_events

    if args.file.startswith(("http://", "https://")):
        return _import_url(args)
    if args.file != "-" and not Path(args.file).is_file():
        raise FileNotFoundError(f"no export file at {args.file}")
    with _open(args, upgrade=True) as store:
        if args.file == "-":
            n = import_events(store, sys.stdin, "stdin")
        else:
            with open(args.file) as f:
                n = import_events(store, f, args.file)
        print(json.dumps({"events": n, **store.counts(), "cursor": store.cursor()}))
    return 0


def import_url(store, source: str, after: int = 0) -> dict:
    """Stream ``/feedback/stream?after=C`` of a running service into ``store``, line by line; returns the
    events read and the stream's final cursor. A stream cut short is a ValueError (importing is idempotent,
    so running it again is safe)."""
    from ..remote import request
    from .exchange import import_events

    base = source.rstrip("/")
    url = base if "/feedback/stream" in base else f"{base}/feedback/stream?after={int(after)}"
    end: dict = {}

    def lines(resp):
        for raw in resp:
            line = raw.decode("utf-8")
            if line.strip():
                event = json.loads(line)
                if event.get("kind") == "end":
                    end.update(event)
            yield line

    resp = request("GET", url, timeout=60, accept="application/x-ndjson")
    with resp:
        n = import_events(store, lines(resp), url)
    if not end:
        raise ValueError(f"{url}: the stream ended without its final status line (cut short after {n} "
                         "events); run the import again: it is idempotent")
    return {"events": n, "stream_cursor": end.get("cursor")}


def _import_url(args) -> int:
    with _open(args, upgrade=True) as store:
        res = import_url(store, args.file, args.after)
        print(json.dumps({"events": res["events"], **store.counts(), "stream_cursor": res["stream_cursor"]}))
    return 0
