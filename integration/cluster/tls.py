"""The federation's certificate authority: one `trustme` CA per run.

Real Arvados controllers serve TLS and federation calls between controllers always use
https (``services/api/app/models/api_client_authorization.rb`` validate). The emulator
generates a CA per run, writes it to ``DIR/ca.pem`` for clients (``SSL_CERT_FILE`` for the
Python SDK, ``REQUESTS_CA_BUNDLE``/``ca_file`` for others), issues one server certificate
valid for 127.0.0.1 and localhost, and uses the same CA when one controller calls another.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import trustme


class Authority:
    def __init__(self, state_dir: Path):
        self._ca = trustme.CA(organization_name="fedmount emulated federation")
        self._cert = self._ca.issue_cert("127.0.0.1", "localhost")
        self.ca_path = state_dir / "ca.pem"
        self._ca.cert_pem.write_to_path(str(self.ca_path))

    def server_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._cert.configure_cert(ctx)
        return ctx

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca_path))
