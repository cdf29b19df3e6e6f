"""The defaults that the command line shows, in one module that imports nothing.

``fedmount --help`` prints these numbers; importing the layers that use them would load
trio, sqlite3, xxhash, httpx and urllib3 for a help text. The layers keep their own names
for them (``DEFAULT_READ_AHEAD_BLOCKS`` in `fedmount.blocks.readahead`, ...); a unit test
(tests/test_cli.py) checks that each one is the value given here.
"""

from __future__ import annotations

MiB = 1 << 20

READ_AHEAD_BLOCKS = 8  # blocks a sequential reader's read-ahead window grows to
KEEP_MIN_RATE = 32 * 1024  # bytes/s a Keep transfer must average over KEEP_RATE_WINDOW (the SDK's)
KEEP_RATE_WINDOW = 256.0  # seconds over which KEEP_MIN_RATE is judged (the SDK's)
MAX_MANIFEST_SIZE = 256 * MiB  # the biggest API answer (a collection record) read
API_WAIT = 10.0  # seconds a FUSE request waits for the API
BYTES_PER_SECOND = 50 * MiB  # transfer estimates before any throughput was observed
STATS_MAX_CONNECTIONS = 16  # --stats-port: connections served at once
STATS_CONNECTION_SECONDS = 5.0  # --stats-port: a connection is closed this long after it was accepted
