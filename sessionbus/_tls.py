"""A private certificate authority for one deployment, and the certificates it signs.

``sessionbus tls init DIR`` makes ``ca.pem`` / ``ca-key.pem`` (kept only
where certificates are issued); ``sessionbus tls issue DIR NAME --host H``
signs a certificate for a server (every name and address it is reached by)
or a client. Keys are ECDSA P-256, written with mode 0600. Servers present
their certificate to clients, to each other on routes and to leaf nodes,
and verify peers against ``ca.pem``; clients trust ``ca.pem``
(``?tls_ca_file=`` in the URL, or ``SESSIONBUS_TLS_CA_FILE``).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sessionbus.bus.errors import ConfigError

__all__ = ["CA_CERT", "CA_KEY", "Issued", "init_ca", "issue"]

CA_CERT = "ca.pem"
CA_KEY = "ca-key.pem"


@dataclass(frozen=True)
class Issued:
    """Files of one issued certificate."""

    cert_file: Path
    key_file: Path
    ca_file: Path


def _write(path: Path, data: bytes, mode: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, mode)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def init_ca(directory: str | os.PathLike[str], *, name: str = "sessionbus deployment CA",
            days: int = 3650) -> Path:
    """Create the CA in ``directory`` (kept if it exists); return the CA certificate's path."""
    root = Path(directory)
    cert_path, key_path = root / CA_CERT, root / CA_KEY
    if cert_path.exists() and key_path.exists():
        return cert_path
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False,
            encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                       critical=False)
        .sign(key, hashes.SHA256())
    )
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert_path


def _san(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def issue(directory: str | os.PathLike[str], name: str, *, hosts: Sequence[str] = (),
          days: int = 825) -> Issued:
    """Sign a certificate ``<name>.pem`` / ``<name>-key.pem`` with the CA in ``directory``.

    With ``hosts`` it is a server certificate naming them (it also serves as
    the server's client certificate on routes and leaf connections);
    without, a client certificate.
    """
    root = Path(directory)
    try:
        ca_cert = x509.load_pem_x509_certificate((root / CA_CERT).read_bytes())
        ca_key = serialization.load_pem_private_key((root / CA_KEY).read_bytes(), None)
    except (OSError, ValueError) as e:
        raise ConfigError(f"no CA in {root} (run 'sessionbus tls init {root}'): {e}") from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{root / CA_KEY} is not an EC key this tool made")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    usages = [ExtendedKeyUsageOID.CLIENT_AUTH]
    if hosts:
        usages.insert(0, ExtendedKeyUsageOID.SERVER_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
    )
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName(_san(hosts)), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_path, key_path = root / f"{name}.pem", root / f"{name}-key.pem"
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return Issued(cert_file=cert_path, key_file=key_path, ca_file=root / CA_CERT)
