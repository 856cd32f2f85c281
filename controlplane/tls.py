"""The gateway's TLS material: a private CA and a server certificate signed by it (cryptography).

Made once: by the gateway on its first start (`ensure_tls`, the quickstart), or beforehand by the operator with
`airlock-cp tls init` (`create_tls`; on-prem, one certificate for every gateway replica). Appliances are given
ca.pem and trust that CA only. The CA private key is used once and never written: no further certificate can
be minted from a stolen disk.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from protocol.files import write_atomic


@dataclass(frozen=True)
class TlsFiles:
    ca_cert: Path
    cert: Path
    key: Path


def _write(path: Path, data: bytes, mode: int) -> None:
    write_atomic(path, data, mode=mode)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "airlock"),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def tls_files(directory: str | os.PathLike[str]) -> TlsFiles:
    root = Path(directory)
    return TlsFiles(root / "ca.pem", root / "gateway.pem", root / "gateway.key")


def ensure_tls(directory: str | os.PathLike[str], hostnames: list[str], *, days: int = 825) -> TlsFiles:
    """Create the CA and server certificate if missing; an existing set is kept as it is."""
    files = tls_files(directory)
    if all(p.exists() for p in (files.ca_cert, files.cert, files.key)):
        return files
    return create_tls(directory, hostnames, days=days)


def create_tls(directory: str | os.PathLike[str], hostnames: list[str], *, days: int = 825) -> TlsFiles:
    """A new CA and a server certificate for `hostnames` (DNS names or IP addresses), replacing any there."""
    if not hostnames:
        raise ValueError("a server certificate needs at least one hostname")
    files = tls_files(directory)
    Path(directory).mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    # A name of its own per CA: a client trusting another airlock CA then says "unable to get local issuer
    # certificate" rather than a puzzling "certificate signature failure" from a same-named CA.
    ca_name = _name(f"airlock control plane CA {secrets.token_hex(4)}")
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (x509.CertificateBuilder().subject_name(_name(hostnames[0])).issuer_name(ca.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    _write(files.key, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()), 0o600)
    _write(files.cert, cert.public_bytes(pem), 0o644)
    _write(files.ca_cert, ca.public_bytes(pem), 0o644)
    return files


def fingerprint(cert_file: str | os.PathLike[str]) -> str:
    """SHA-256 of the certificate's DER bytes, as openssl prints it (AB:CD:...): to compare ca.pem copies by eye."""
    cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
    return ":".join(f"{b:02X}" for b in hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest())
