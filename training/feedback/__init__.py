"""The feedback store (issue 7, section 1): generations, expert ratings and comparisons, with a cursor.

``store`` is the public API (``open_store``, ``FeedbackStore``, the records); ``models`` the SQLAlchemy
tables and ``migrations`` their Alembic scripts; ``db`` URLs, engines and upgrades; ``blobs`` the
content-addressed image files; ``exchange`` NDJSON export / import; ``command`` the ``cxrgen store`` and
``cxrgen feedback`` commands; ``pgtemp`` a throwaway PostgreSQL cluster for tests and benchmarks;
``stress`` the concurrent writers the tests and benchmarks/store.py share.
"""
