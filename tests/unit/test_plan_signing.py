"""Plan signatures: the controller's signer (once per body and generation) and the agent's
check (controller.server.signing, controller.agent.signing)."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from controller.agent.controller_link import ControllerUnavailable
from controller.agent.signing import PlanRefused, check_signature, load_plan_keys
from controller.config.errors import ConfigError
from controller.server.signing import PlanSigner, load_signing_key
from lab.tls import LabCa, plan_signing_key

BODY = b'{"pop":"sjc","generation":7,"revision":"r","digest":"","vips":[]}'


class CountingKey:
    """An Ed25519 key that counts its signatures."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self.key, self.signed = key, 0

    def sign(self, data: bytes) -> bytes:
        self.signed += 1
        return self.key.sign(data)

    def public_key(self):  # type: ignore[no-untyped-def]
        return self.key.public_key()


def test_a_body_is_signed_once_per_generation_and_the_agent_accepts_it(tmp_path: Path) -> None:
    pair = plan_signing_key(tmp_path)
    key = CountingKey(load_signing_key(str(pair.key)))
    signer = PlanSigner(key)  # type: ignore[arg-type]
    zipped = gzip.compress(BODY)
    first = signer.header("sjc", 7, zipped, True)
    assert all(signer.header("sjc", 7, zipped, True) == first for _ in range(100))
    assert key.signed == 1  # a hundred fetches of one generation: one signature
    keys = load_plan_keys([str(pair.cert)])
    check_signature(keys, first, BODY)  # over the JSON, whether it travelled gzipped or not
    signer.header("sjc", 8, gzip.compress(BODY), True)
    assert key.signed == 2


@pytest.mark.parametrize("case", ["no header", "another key", "bad base64", "wrong signature", "edited body"])
def test_a_plan_without_a_valid_signature_is_refused(tmp_path: Path, case: str) -> None:
    ours, theirs = plan_signing_key(tmp_path, "ours"), plan_signing_key(tmp_path, "theirs")
    keys = load_plan_keys([str(ours.cert)])
    good = PlanSigner(load_signing_key(str(ours.key))).header("sjc", 1, BODY, False)
    header, body = {
        "no header": (None, BODY),
        "another key": (PlanSigner(load_signing_key(str(theirs.key))).header("sjc", 1, BODY, False), BODY),
        "bad base64": (good.split(":")[0] + ":not base64!", BODY),
        "wrong signature": (good[:-8] + "AAAAAAA=", BODY),
        "edited body": (good, BODY.replace(b'"vips":[]', b'"vips":[ ]')),
    }[case]
    with pytest.raises(PlanRefused) as info:
        check_signature(keys, header, body)
    assert info.value.reason == "signature"


def test_bad_key_files_are_named(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key\n")
    with pytest.raises(ConfigError, match="api.signing_key: cannot load .*bad.pem"):
        load_signing_key(str(bad))
    with pytest.raises(ControllerUnavailable, match="cannot load the plan key .*bad.pem"):
        load_plan_keys([str(bad)])
    ca = LabCa(tmp_path / "ec")  # an EC key, not Ed25519
    with pytest.raises(ConfigError, match="is not an Ed25519 key"):
        load_signing_key(str(ca.server().key))
