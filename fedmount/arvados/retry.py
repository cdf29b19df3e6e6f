"""What every Arvados client sends and waits, the API and Keep clients alike.

- `new_request_id`: the ``X-Request-Id`` of one request, ``req-`` and 20 lowercase letters
  or digits, as the Arvados SDKs make them (servers log it; a person can grep for it).
- `backoff_delay`: the wait before retry number `attempt` (0 for the first retry):
  exponential, ``base * 2**attempt`` capped at `cap`, with "equal jitter" (a uniformly
  random point of its upper half), so that clients that failed together do not come back
  together, and none comes back sooner than half the wait.
"""

from __future__ import annotations

import random
import secrets
import string

_REQUEST_ID_CHARS = string.ascii_lowercase + string.digits


def new_request_id() -> str:
    return "req-" + "".join(secrets.choice(_REQUEST_ID_CHARS) for _ in range(20))


def backoff_delay(attempt: int, base: float, cap: float) -> float:
    return min(cap, base * 2**attempt) * random.uniform(0.5, 1.0)
