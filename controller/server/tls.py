"""HTTPS for the controller's API, optionally mutual (agents present a client certificate).

One ``ssl.SSLContext`` serves the listening socket for the life of the process; a reload
loads the certificate and key into it again (new handshakes get the new pair: rotation is
``systemctl reload``). The pair is first loaded into a throwaway context, so a bad file is a
rejected reload that leaves the served pair as it was. Client CAs are added, never removed,
by a reload (OpenSSL cannot forget one): dropping an old client CA takes a restart.

With ``client_ca``, a client certificate is optional at the TLS layer (operators' anycastctl
uses only its token) but required by every POP endpoint: its subject CN or a DNS
subjectAltName must be the POP's name (``app._pop_auth``).
"""

from __future__ import annotations

import ssl
from typing import Any

from ..config.desired_model import TlsSettings
from ..config.errors import ConfigError, ConfigIssue


def _context(settings: TlsSettings) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    _load(ctx, settings)
    return ctx


def _load(ctx: ssl.SSLContext, settings: TlsSettings) -> None:
    try:
        ctx.load_cert_chain(settings.cert, settings.key)
    except (OSError, ssl.SSLError) as exc:
        raise _error("api.tls.cert", f"cannot load {settings.cert} with key {settings.key}: {exc}") from None
    if settings.client_ca is not None:
        try:
            ctx.load_verify_locations(cafile=settings.client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise _error("api.tls.client_ca", f"cannot load {settings.client_ca}: {exc}") from None
        ctx.verify_mode = ssl.CERT_OPTIONAL


def _error(path: str, message: str) -> ConfigError:
    return ConfigError("controller.yaml", [ConfigIssue(path, message)])


class ServerTls:
    """The API's TLS context, built at start and reloaded with the config."""

    def __init__(self, settings: TlsSettings) -> None:
        self.settings = settings
        self.context = _context(settings)

    def reload(self, settings: TlsSettings | None) -> None:
        """Load the (possibly renewed) files again; ConfigError, with nothing changed, if
        they do not load or TLS would be switched off (that takes a restart)."""
        if settings is None:
            raise _error("api.tls", "TLS was on at start: switching it off takes a restart")
        _context(settings)  # fails here, before the served context is touched
        _load(self.context, settings)
        self.settings = settings


def peer_names(peercert: Any) -> set[str]:
    """The names a verified client certificate carries: subject CN and DNS subjectAltNames."""
    if not isinstance(peercert, dict):
        return set()
    names = {value for rdn in peercert.get("subject", ()) for key, value in rdn if key == "commonName"}
    names |= {value for kind, value in peercert.get("subjectAltName", ()) if kind == "DNS"}
    return names
