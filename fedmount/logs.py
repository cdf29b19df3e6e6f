"""fedmount's logs: redacted, in files readable by their owner only, and where a detached
daemon's log goes.

`setup_logging` is what every fedmount command calls first: one handler (stderr or
``--logfile``), fedmount's line format, and a `RedactingFilter` that masks anything
token-shaped and every locator signature in every record at every level (urllib3's debug
lines carry signed locators), so that no token is ever logged.

A detached daemon's stderr is /dev/null once the mount is ready, so without a file every
later line (a cluster going down, a corrupt block, an unmount) would be lost. Its log goes
to a file a user can find without asking:

    $XDG_STATE_HOME/fedmount/logs/<mount point>-<8 hex>.log   (default ~/.local/state/...)

``$XDG_STATE_HOME`` is where the XDG base directory specification puts logs. The name is
the mount point's path with ``/`` as ``-`` (``/mnt/keep`` -> ``mnt-keep``), then the
first 8 hex digits of the path's SHA-1, so that ``/a-b`` and ``/a/b`` never share a file.
The "mounted" line, which the daemon prints on the terminal before it detaches, names the
file.

The file is bounded: it is rotated at `MAX_BYTES` with `BACKUPS` older files kept
(``.1`` ... ``.3``), at most 40 MiB per mount point. Until the mount is ready the daemon
logs to stderr as well (`mount._daemonize` drops that handler when it detaches).

Every log file fedmount creates is created mode 0600 (`open_private`), in a directory
created 0700: the log names collections and files, never a token, but it is nobody
else's business.
"""

from __future__ import annotations

import hashlib
import logging
import logging.handlers
import os
import sys
from collections.abc import Mapping
from typing import IO

from fedmount.arvados.tokens import redact

MAX_BYTES = 10 << 20
BACKUPS = 3


def log_dir(env: Mapping[str, str] = os.environ) -> str:
    state = env.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "fedmount", "logs")


def detached_log_path(mountpoint: str, env: Mapping[str, str] = os.environ) -> str:
    """The default log file of a detached daemon mounted at `mountpoint` (absolute)."""
    slug = mountpoint.strip("/").replace("/", "-") or "root"
    digest = hashlib.sha1(mountpoint.encode(errors="surrogateescape")).hexdigest()[:8]
    return os.path.join(log_dir(env), f"{slug[:100]}-{digest}.log")


def open_private(path: str) -> IO[str]:
    """Open `path` for appending, creating it mode 0600 (an existing file keeps its mode)."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "a", encoding="utf-8", errors="backslashreplace")


class PrivateRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A size-bounded log whose files, the first and every one after a rotation, are 0600."""

    def _open(self) -> IO[str]:  # type: ignore[override]
        return open_private(self.baseFilename)


def add_detached_log(path: str) -> bool:
    """Log to `path` too (rotated, 0600), formatted and filtered as the handler already set
    up (`setup_logging`); False, with one line on stderr, if it cannot be opened."""
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        handler = PrivateRotatingFileHandler(path, maxBytes=MAX_BYTES, backupCount=BACKUPS)
    except OSError as e:
        print(f"fedmount: cannot write the log to {path} ({e.strerror}); once detached, log lines are "
              "lost: give --logfile FILE", file=sys.stderr)
        return False
    root = logging.getLogger()
    template = root.handlers[0]
    handler.setFormatter(template.formatter)
    for log_filter in template.filters:
        handler.addFilter(log_filter)
    root.addHandler(handler)
    return True


class RedactingFilter(logging.Filter):
    """Masks anything token-shaped, and locator signatures, in a record, its arguments and its
    traceback (`redact`), at every level: urllib3's debug lines carry signed locators."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = None
        if record.exc_info:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
            record.exc_info = None
        return True


def setup_logging(debug: bool, logfile: str | None) -> None:
    """Log to `logfile` (created 0600; OSError if it cannot be written) or stderr, redacted."""
    handler = logging.StreamHandler(open_private(logfile) if logfile else sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s fedmount[%(process)d] %(levelname)s: %(message)s"))
    handler.addFilter(RedactingFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for noisy in ("httpx", "httpcore", "urllib3", "pyfuse3", "trio"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if debug else logging.WARNING)
