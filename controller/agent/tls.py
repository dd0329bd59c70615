"""The agent's side of HTTPS to the controller: which CA it trusts, which certificate it shows."""

from __future__ import annotations

import ssl

from ..config.model import ClientTls
from .controller_link import ControllerUnavailable


def client_context(url: str, tls: ClientTls) -> ssl.SSLContext | None:
    """The context for ``url`` (None for http://: aiohttp's default); ControllerUnavailable,
    naming the file, if the CA or the client pair does not load (the agent does not start)."""
    if not url.startswith("https://"):
        return None
    try:
        ctx = ssl.create_default_context(cafile=tls.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise ControllerUnavailable(f"cannot load the controller CA {tls.ca_file}: {exc}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if tls.cert is not None:
        try:
            ctx.load_cert_chain(tls.cert, tls.key)
        except (OSError, ssl.SSLError) as exc:
            raise ControllerUnavailable(f"cannot load the client certificate {tls.cert} with key {tls.key}: "
                                        f"{exc}") from None
    return ctx
