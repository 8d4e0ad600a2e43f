"""``regproxy certs init``: a local CA and a server certificate signed by it.

The CA (``ca.crt``/``ca.key``) is created once and reused, so re-running with more names
re-issues only the server certificate and clients keep trusting it. Keys are EC P-256 and
written with mode 0600, certificates 0644, each through a fresh temp file (see
:mod:`proxy.atomicfile`).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy.atomicfile import write_atomic


@dataclass(frozen=True)
class CertPaths:
    ca_cert: Path
    ca_key: Path
    cert: Path
    key: Path
    created_ca: bool


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    write_atomic(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption()))


def _write_cert(path: Path, cert: x509.Certificate) -> None:
    write_atomic(path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def create_ca(common_name: str = "regproxy local CA", days: int = 3650
              ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "regproxy")])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def issue(ca_cert: x509.Certificate, ca_key: ec.EllipticCurvePrivateKey, hosts: list[str],
          ips: list[str], days: int = 397, client: bool = False
          ) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A leaf certificate for ``hosts``/``ips`` (server), or for the name ``hosts[0]`` (client)."""
    if not hosts and not ips:
        raise ValueError("give at least one --host or --ip")
    key = ec.generate_private_key(ec.SECP256R1())
    cn = hosts[0] if hosts else ips[0]
    sans: list[x509.GeneralName] = [x509.DNSName(h) for h in hosts]
    sans += [x509.IPAddress(ipaddress.ip_address(a)) for a in ips]
    now = _now()
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca_cert.subject).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=False, crl_sign=False,
                                     content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert, key


def load_or_create_ca(directory: Path) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey, bool]:
    ca_cert_path, ca_key_path = directory / "ca.crt", directory / "ca.key"
    if ca_cert_path.exists() and ca_key_path.exists():
        cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError(f"{ca_key_path}: expected an EC private key")
        return cert, key, False
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = create_ca()
    _write_key(ca_key_path, key)
    _write_cert(ca_cert_path, cert)
    return cert, key, True


def init(directory: Path, hosts: list[str], ips: list[str], days: int = 397,
         name: str = "server") -> CertPaths:
    """Create (or reuse) the CA in ``directory`` and write ``<name>.crt``/``<name>.key``."""
    for a in ips:
        ipaddress.ip_address(a)  # ValueError for a bad address, before anything is written
    ca_cert, ca_key, created = load_or_create_ca(directory)
    cert, key = issue(ca_cert, ca_key, hosts, ips, days)
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    _write_key(key_path, key)  # key first: a reload never pairs a new cert with an old key
    _write_cert(cert_path, cert)
    return CertPaths(directory / "ca.crt", directory / "ca.key", cert_path, key_path, created)


def issue_client(directory: Path, name: str, days: int = 397) -> tuple[Path, Path]:
    """A client certificate for mutual TLS, signed by the CA in ``directory``:
    ``<name>.cert``/``<name>.key`` (the names Docker's certs.d expects)."""
    ca_cert, ca_key, _ = load_or_create_ca(directory)
    cert, key = issue(ca_cert, ca_key, [name], [], days, client=True)
    cert_path, key_path = directory / f"{name}.cert", directory / f"{name}.key"
    _write_key(key_path, key)
    _write_cert(cert_path, cert)
    return cert_path, key_path


def trust_instructions(paths: CertPaths, hosts: list[str], ips: list[str], port: int) -> str:
    """How to make Docker, containerd and podman trust the CA."""
    names = [*hosts, *ips]
    host = names[0]
    hp = f"{host}:{port}"
    ca = paths.ca_cert.resolve()
    return f"""\
CA certificate:     {ca}{' (new)' if paths.created_ca else ' (existing, reused)'}
Server certificate: {paths.cert.resolve()} (names: {', '.join(names)})
Server key:         {paths.key.resolve()}

config.toml:
  [tls]
  cert = "{paths.cert.resolve()}"
  key = "{paths.key.resolve()}"

Trust the CA on each client (repeat for every name clients use):
  Docker:     sudo mkdir -p /etc/docker/certs.d/{hp} && sudo cp {ca} /etc/docker/certs.d/{hp}/ca.crt
              (no daemon restart needed; for registry-mirrors use "https://{hp}")
  containerd: in /etc/containerd/certs.d/<registry>/hosts.toml:
                [host."https://{hp}"]
                  capabilities = ["pull", "resolve"]
                  ca = "{ca}"
  podman:     sudo mkdir -p /etc/containers/certs.d/{hp} && sudo cp {ca} /etc/containers/certs.d/{hp}/ca.crt
  skopeo:     skopeo inspect --cert-dir DIR_WITH_ONLY_ca.crt docker://{hp}/library/alpine:latest
  system:     sudo cp {ca} /usr/local/share/ca-certificates/regproxy.crt && sudo update-ca-certificates
"""
