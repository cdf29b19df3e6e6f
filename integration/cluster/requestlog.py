"""The request log, ``DIR/requests.jsonl``: one JSON line per request any service received.

Fields: ``cluster``, ``service`` (controller, keep0, keep1, ...), ``method``, ``path`` (with
the query), ``token`` (the token exactly as received, from the Authorization header or the
``api_token`` parameter, or null), ``status``, ``bytes`` (body bytes sent),
``from_service`` (``"<cluster>/<service>"`` when another emulated service sent the request,
e.g. a keepstore fetching a ``+R`` block from a remote cluster; null for clients), ``time``
(unix seconds when the request arrived) and ``duration`` (seconds). Tests use it to prove, for
instance, that no remote cluster ever received the home cluster's unsalted token.
Lines are written whole and flushed at once, so a reader never sees half a record.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path


class RequestLog:
    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._file = open(path, "a", encoding="utf-8")

    def write(self, **record: object) -> None:
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()
