"""A throw-away CA (``trustme``) and the certificates the TLS tests need.

``pki`` (session fixture, import it into a test module): the CA, another CA that
signed nothing here, a server certificate for localhost/127.0.0.1, one that expired
yesterday, and a client certificate (key apart and in one file).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    import trustme

HOST = "127.0.0.1"


@dataclass
class Pki:
    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path
    expired_cert: Path
    client_cert: Path
    client_key: Path
    #: certificate and key in one file (Python's ssl takes the key from certfile).
    client_combined: Path


def _expired_cert(ca: trustme.CA, directory: Path) -> tuple[Path, Path]:
    """A server certificate for localhost/127.0.0.1 signed by ``ca``, valid from 30
    days ago to yesterday."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "expired")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=30))
        .not_valid_after(now - datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )
    cert_path, key_path = directory / "expired.pem", directory / "expired.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    # imported here: conftest imports this module, and the wheel's install test runs the
    # tutorial tests in a venv without the TLS tests' dependencies
    import trustme

    directory = tmp_path_factory.mktemp("redis-tls")
    ca, other = trustme.CA(), trustme.CA()
    paths = {name: directory / f"{name}.pem" for name in ("ca", "other_ca", "server", "skey")}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    other.cert_pem.write_to_path(str(paths["other_ca"]))
    server = ca.issue_cert("localhost", HOST)
    server.cert_chain_pems[0].write_to_path(str(paths["server"]))
    server.private_key_pem.write_to_path(str(paths["skey"]))
    client = ca.issue_cert("celeriac-client")
    client_cert, client_key = directory / "client.pem", directory / "client.key"
    client.cert_chain_pems[0].write_to_path(str(client_cert))
    client.private_key_pem.write_to_path(str(client_key))
    combined = directory / "client-combined.pem"
    client.private_key_and_cert_chain_pem.write_to_path(str(combined))
    expired_cert, _ = _expired_cert(ca, directory)
    return Pki(
        ca=paths["ca"],
        other_ca=paths["other_ca"],
        server_cert=paths["server"],
        server_key=paths["skey"],
        expired_cert=expired_cert,
        client_cert=client_cert,
        client_key=client_key,
        client_combined=combined,
    )
