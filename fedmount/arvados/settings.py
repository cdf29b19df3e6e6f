"""Where the home cluster is and who we are: the Arvados client settings.

Sources, the first that sets a key wins (as the Arvados SDKs do):

1. the environment: ``ARVADOS_API_HOST``, ``ARVADOS_API_TOKEN``,
   ``ARVADOS_API_HOST_INSECURE``;
2. ``settings.conf``: ``KEY=VALUE`` lines (blank lines and ``#`` comments ignored), by
   default ``$XDG_CONFIG_HOME/arvados/settings.conf`` or ``~/.config/arvados/settings.conf``.

``ARVADOS_API_TOKEN`` is a v2 token (``v2/<uuid>/<secret>``) or, as the SDK and arv-mount
accept it, a v1 token (the bare secret); `Federation.connect` turns a v1 token into its v2
form once the home cluster has said its uuid.

``ARVADOS_KEEP_SERVICES`` (space-separated URLs; crunch-run sets it to a node-local
keepstore) or ``ARVADOS_KEEP_PROXY`` replace the home cluster's keep service list, as they
do for the Python SDK.

The CA bundle is ``REQUESTS_CA_BUNDLE`` or ``SSL_CERT_FILE`` when set, else
``/etc/arvados/ca-certificates.crt`` when it exists (crunch-run puts the cluster's CA
there inside containers), else None: the system's default trust store.

Anything missing or unusable raises `SettingsError` with one line saying what to set.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from .tokens import ApiToken, TokenError, parse_token

ARVADOS_CA_FILE = "/etc/arvados/ca-certificates.crt"
DEFAULT_SETTINGS_FILE = "~/.config/arvados/settings.conf"
_TRUE = frozenset({"1", "t", "true", "y", "yes", "on"})


class SettingsError(ValueError):
    """Missing or unusable client settings; the message says what to set."""


def read_settings_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines of `path`; {} if it does not exist."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    except OSError as e:
        raise SettingsError(f"cannot read {path}: {e.strerror}") from None
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def _normalize_host(host: str) -> str:
    for scheme in ("https://", "http://"):
        if host.startswith(scheme):
            host = host[len(scheme) :]
    return host.rstrip("/")


@dataclass
class Settings:
    api_host: str  # host[:port] of the home controller, as ARVADOS_API_HOST gives it
    token: ApiToken
    insecure: bool = False
    ca_file: str | None = None  # None: the system trust store
    keep_services: tuple[str, ...] = ()  # root URLs overriding the home's keep services

    @classmethod
    def from_environment(
        cls, env: Mapping[str, str] = os.environ, settings_file: str | None = None
    ) -> Settings:
        if settings_file is None:
            xdg = env.get("XDG_CONFIG_HOME")
            settings_file = f"{xdg}/arvados/settings.conf" if xdg else DEFAULT_SETTINGS_FILE
        path = Path(os.path.expanduser(settings_file))
        merged = read_settings_file(path)
        merged.update({k: v for k, v in env.items() if k.startswith("ARVADOS_") and v})
        host = _normalize_host(merged.get("ARVADOS_API_HOST", ""))
        token_text = merged.get("ARVADOS_API_TOKEN", "")
        missing = [k for k, v in (("ARVADOS_API_HOST", host), ("ARVADOS_API_TOKEN", token_text)) if not v]
        if missing:
            raise SettingsError(
                f"{' and '.join(missing)} not set: export {'/'.join(missing)} or put "
                f"KEY=VALUE lines in {path}"
            )
        try:
            token = parse_token(token_text)
        except TokenError as e:
            raise SettingsError(f"ARVADOS_API_TOKEN: {e}") from None
        insecure = merged.get("ARVADOS_API_HOST_INSECURE", "").lower() in _TRUE
        ca_file = env.get("REQUESTS_CA_BUNDLE") or env.get("SSL_CERT_FILE")
        if ca_file and not os.path.isfile(ca_file):
            raise SettingsError(f"CA bundle {ca_file} (REQUESTS_CA_BUNDLE/SSL_CERT_FILE) does not exist")
        if not ca_file and os.path.isfile(ARVADOS_CA_FILE):
            ca_file = ARVADOS_CA_FILE
        keep_text = merged.get("ARVADOS_KEEP_SERVICES") or merged.get("ARVADOS_KEEP_PROXY", "")
        keep_services = tuple(url if url.endswith("/") else url + "/" for url in keep_text.split())
        for url in keep_services:
            parsed = urlparse(url)
            if parsed.scheme not in ("http", "https") or not parsed.netloc:
                raise SettingsError(f"ARVADOS_KEEP_SERVICES: {url!r} is not an http(s) URL")
        return cls(host, token, insecure, ca_file, keep_services)
