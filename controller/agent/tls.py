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


def plaintext_warning(url: str) -> str | None:
    """A warning to log when the agent would send its token in clear beyond this host."""
    host = url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0].strip("[]")
    if url.startswith("https://") or host in ("127.0.0.1", "::1", "localhost"):
        return None
    return f"the controller URL {url} is plain HTTP: the POP's token and plans cross the network in clear"
