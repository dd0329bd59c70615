"""The agent's side of signed plans: the controller's public keys (``controller.plan_keys``),
and the check every plan answer must pass before it is applied (controller.server.signing)."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from ..wire import SIGNATURE_HEADER, plan_key_id
from .controller_link import ControllerUnavailable


class PlanRefused(ControllerUnavailable):
    """A plan answer that must not be applied; ``reason`` is the metric's label."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def load_plan_keys(paths: Iterable[str]) -> dict[str, Ed25519PublicKey]:
    """Key id -> Ed25519 public key, from PEM files; ControllerUnavailable naming a bad one
    (the agent does not start)."""
    keys = {}
    for path in paths:
        try:
            with open(path, "rb") as f:
                key = serialization.load_pem_public_key(f.read())
        except (OSError, ValueError) as exc:
            raise ControllerUnavailable(f"cannot load the plan key {path}: {exc}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise ControllerUnavailable(f"the plan key {path} is not an Ed25519 public key")
        keys[plan_key_id(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))] = key
    return keys


def check_signature(keys: Mapping[str, Ed25519PublicKey], header: str | None, body: bytes) -> None:
    """Raise PlanRefused unless ``header`` is a valid signature of ``body`` by one of ``keys``."""
    if not header:
        raise PlanRefused("signature", f"the plan carries no {SIGNATURE_HEADER}: not from a controller "
                                       "holding the signing key")
    key_id, _, encoded = header.partition(":")
    key = keys.get(key_id)
    if key is None:
        raise PlanRefused("signature", f"the plan is signed by key {key_id[:16]!r}, not one of the plan_keys "
                                       f"({', '.join(sorted(keys))})")
    try:
        key.verify(base64.b64decode(encoded, validate=True), body)
    except (InvalidSignature, binascii.Error, ValueError):
        raise PlanRefused("signature", f"the plan's signature by key {key_id} does not verify") from None
