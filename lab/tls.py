"""A throwaway certificate authority for the lab and the tests: a CA, a server certificate for
the controller's address, and client certificates that name POPs (mTLS). Never for production:
the keys are written unencrypted next to the certificates."""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pair:
    cert: Path
    key: Path


class LabCa:
    """``LabCa(directory)`` makes ca.pem; ``server(...)`` and ``client(pop)`` issue from it."""

    def __init__(self, directory: Path, name: str = "anycast lab CA") -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.dir = directory
        self._key = ec.generate_private_key(ec.SECP256R1())
        self._name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self._cert = (self._builder(self._name, self._key.public_key())
                      .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                      .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False),
                                     critical=True)
                      .sign(self._key, hashes.SHA256()))
        self.ca = directory / "ca.pem"
        self.ca.write_bytes(self._cert.public_bytes(serialization.Encoding.PEM))

    def _builder(self, subject: x509.Name, public: ec.EllipticCurvePublicKey) -> x509.CertificateBuilder:
        now = datetime.datetime.now(datetime.timezone.utc)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(self._name).public_key(public)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=2)))

    def _issue(self, stem: str, common_name: str, sans: list[x509.GeneralName],
               usage: x509.ObjectIdentifier) -> Pair:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        cert = (self._builder(subject, key.public_key())
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(self._key, hashes.SHA256()))
        pair = Pair(self.dir / f"{stem}.pem", self.dir / f"{stem}.key")
        pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        pair.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        pair.key.chmod(0o600)
        return pair

    def server(self, stem: str = "controller", addresses: tuple[str, ...] = ("127.0.0.1",),
               names: tuple[str, ...] = ("localhost",)) -> Pair:
        sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(a)) for a in addresses]
        sans += [x509.DNSName(n) for n in names]
        return self._issue(stem, names[0] if names else addresses[0], sans, ExtendedKeyUsageOID.SERVER_AUTH)

    def client(self, pop: str, stem: str | None = None) -> Pair:
        """A client certificate naming ``pop`` (CN and DNS subjectAltName)."""
        return self._issue(stem or f"agent-{pop}", pop, [x509.DNSName(pop)], ExtendedKeyUsageOID.CLIENT_AUTH)

    def serial(self, pair: Pair) -> int:
        return x509.load_pem_x509_certificate(pair.cert.read_bytes()).serial_number


def plan_signing_key(directory: Path, stem: str = "plan-signing") -> Pair:
    """An Ed25519 plan-signing key: ``key`` (private, for api.signing_key) and ``cert`` (here:
    the public key in PEM, for the agents' controller.plan_keys)."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    directory.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pair = Pair(directory / f"{stem}.pub", directory / f"{stem}.key")
    pair.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    pair.key.chmod(0o600)
    pair.cert.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                        serialization.PublicFormat.SubjectPublicKeyInfo))
    return pair


# --- the lab's HTTPS: one CA per lab run, the controller's certificate, the agents' trust ----
@dataclass(frozen=True)
class LabTls:
    """What a lab run serves its API with: ``ca`` (agents, operators and the lab's own
    requests trust it) and ``server`` (every controller address as an IP subjectAltName)."""

    ca: Path
    server: Pair

    def serve(self, config_dir: Path) -> None:
        """controller.yaml's ``api.tls``: this run's certificate (other api keys kept)."""
        path = config_dir / "controller.yaml"
        data = yaml.safe_load(path.read_text())
        data.setdefault("api", {})["tls"] = {"cert": str(self.server.cert), "key": str(self.server.key)}
        path.write_text(yaml.safe_dump(data, sort_keys=False))

    def trust(self, controller: dict[str, Any]) -> None:
        """An agent config's ``controller`` section: https:// URLs and this run's CA."""
        for key in ("url", "urls"):
            if isinstance(controller.get(key), str):
                controller[key] = https(controller[key])
            elif isinstance(controller.get(key), list):
                controller[key] = [https(u) for u in controller[key]]
        controller["ca_file"] = str(self.ca)


def lab_tls(directory: Path, addresses: tuple[str, ...]) -> LabTls:
    """A fresh throwaway CA in ``directory`` and a server certificate for ``addresses``."""
    ca = LabCa(directory)
    return LabTls(ca.ca, ca.server("controller", addresses, ()))


def https(url: str) -> str:
    return "https://" + url.split("://", 1)[1] if url.startswith("http://") else url


# Python run inside a namespace (urllib, no DNS) that must trust the lab CA: prepend this and
# pass the CA file as the LAST argument; ``CTX`` is then the context for urlopen(..., context=CTX).
TRUST_LAST_ARG = "import ssl,sys\nCTX=ssl.create_default_context(cafile=sys.argv[-1])\n"
