"""HTTP calls from the command line to a running cxrgen service (stdlib only, so the CLI stays light).

The API key comes from ``$CXRGEN_API_KEY``; HTTP and connection errors become one-line ``ValueError``s
naming the URL (the CLI prints them without a traceback).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request


def request(method: str, url: str, body: dict | None = None, timeout: float = 120, accept: str | None = None):
    """The open response of ``method url`` (a context manager), with the API key and a JSON body if given."""
    req = urllib.request.Request(url, method=method, data=json.dumps(body).encode() if body is not None else None)
    if body is not None:
        req.add_header("Content-Type", "application/json")
    if accept:
        req.add_header("Accept", accept)
    if os.environ.get("CXRGEN_API_KEY"):
        req.add_header("Authorization", "Bearer " + os.environ["CXRGEN_API_KEY"])
    where = urllib.parse.urlsplit(url)._replace(query="").geturl()
    try:
        return urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        raise ValueError(f"{method} {where}: HTTP {e.code}: {e.read()[:500].decode('utf-8', 'replace')}") from None
    except urllib.error.URLError as e:
        raise ValueError(f"cannot reach {where}: {e.reason}") from None
