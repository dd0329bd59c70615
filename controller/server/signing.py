"""Plan signatures (Ed25519): the controller signs each plan body it serves with
``api.signing_key``; agents holding the public half refuse a plan that is not signed by it, so
a fake controller on the controller's address cannot make an agent withdraw anything.

A body is signed once: ``PlanStore`` serializes a body once per generation and base and hands
back the same body object (plans.Body) until the next generation, so the signature is kept beside the
object it signs, for the POP's current generation only (no body outlives its generation here).
"""

from __future__ import annotations

import base64
import gzip

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ..config.errors import ConfigError, ConfigIssue
from ..wire import plan_key_id
from .plans import Body

KEEP = 8  # signed bodies kept per POP and generation (one per base asked for; more are signed again)


def load_signing_key(path: str) -> Ed25519PrivateKey:
    """The Ed25519 private key in PEM (PKCS8) at ``path``; ConfigError naming it."""
    try:
        with open(path, "rb") as f:
            key = serialization.load_pem_private_key(f.read(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError("controller.yaml", [ConfigIssue("api.signing_key", f"cannot load {path}: {exc}")]) from None
    if not isinstance(key, Ed25519PrivateKey):
        raise ConfigError("controller.yaml", [ConfigIssue("api.signing_key", f"{path} is not an Ed25519 key")])
    return key


class PlanSigner:
    """Signs plan bodies with one key (replaced by ``use``, at a reload)."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._signed: dict[str, tuple[int, list[tuple[Body, str]]]] = {}  # pop -> generation, [(body, header)]
        self.key_id = ""
        self._key = key
        self.use(key)

    def use(self, key: Ed25519PrivateKey) -> None:
        raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        if plan_key_id(raw) != self.key_id:
            self._signed.clear()  # a new key: nothing signed with the old one is served again
        self._key, self.key_id = key, plan_key_id(raw)

    def header(self, pop: str, generation: int, body: Body, gzipped: bool) -> str:
        """The signature header's value for ``body`` of the POP's plan ``generation`` (as
        served: gzipped or not; the signature is over the JSON itself)."""
        held = self._signed.get(pop)
        if held is None or held[0] != generation:
            held = self._signed[pop] = (generation, [])
        kept = held[1]
        for b, value in kept:
            if b is body:
                return value
        signature = self._key.sign(gzip.decompress(bytes(body)) if gzipped else bytes(body))
        value = f"{self.key_id}:{base64.b64encode(signature).decode()}"
        kept.append((body, value))
        del kept[:-KEEP]
        return value
