"""The controller's error: an HTTP status and one message, sent as ``{"errors": [...]}``.

Statuses are Rails' and the Go controller's: 400 for requests the federation layer cannot
execute, 401 not logged in, 403 permission, 404 not found (also for records the caller may
not read), 422 bad parameters (Rails' ArgumentError), 502 when a remote cluster failed.
"""

from __future__ import annotations


class ApiFailure(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
