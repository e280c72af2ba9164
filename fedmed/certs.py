"""``fedmed certs`` and ``fedmed site-key``: the files a TLS, site-authenticated federation needs.

- ``fedmed certs --out certs --host coordinator.example.org --host 10.0.0.5`` creates a
  private CA (``ca.crt``/``ca.key``) and the coordinator's certificate (``server.pem``/
  ``server.key``) whose subjectAltNames list every host or IP the sites will dial.
- ``fedmed site-key --site hospital_a --out keys`` creates the site's key pair
  (``hospital_a`` private, ``hospital_a.pub`` public, OpenSSH ECDSA P-384 as Flower's node
  authentication expects). Only the ``.pub`` goes to the coordinator (``--auth-key``).

Built on ``cryptography`` (already a Flower dependency) rather than shelling out to openssl,
so it works the same on every site's machine.

Neither command replaces an existing file unless asked (``force=True`` / ``--force``): a new
CA key silently invalidates the ``ca.crt`` every site holds, and a new site key locks the site
out until the coordinator gets the new ``.pub``. Files are created with their final mode
(private keys 0600) in one exclusive open, so a key is never briefly world-readable.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmed.errors import FedmedError, UsageError

__all__ = ["WouldOverwrite", "create_certificates", "create_site_key"]

_SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class WouldOverwrite(FedmedError, ValueError):
    """A key or certificate file already exists and ``force`` was not given."""


def _refuse_existing(paths: list[Path], *, force: bool) -> None:
    """Check every target before anything is generated, so no half-replaced set is left."""
    existing = [p for p in paths if p.exists() or p.is_symlink()]
    if existing and not force:
        names = ", ".join(str(p) for p in existing)
        raise WouldOverwrite(f"{names} already exist{'s' if len(existing) == 1 else ''}: refusing to "
                             "overwrite (replacing a CA or site key breaks every party that holds "
                             "the old one); pass --force to replace")


def _write(path: Path, data: bytes, *, private: bool = False, force: bool = False) -> None:
    if force and (path.is_symlink() or path.exists()):
        path.unlink()  # never write through a symlink planted at a key's path
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmed"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def create_certificates(out: Path, *, hosts: list[str], days: int = 825,
                        force: bool = False) -> dict[str, Path]:
    """A CA and a server certificate valid for ``hosts`` (DNS names or IP addresses).

    Raises :class:`WouldOverwrite` naming the files if any of ``ca.crt``, ``ca.key``,
    ``server.pem``, ``server.key`` exists in ``out`` and ``force`` is False (nothing written).
    """
    if not hosts:
        raise UsageError("give at least one --host the sites will connect to (name or IP)")
    out = Path(out)
    files = {"ca_cert": out / "ca.crt", "ca_key": out / "ca.key", "cert": out / "server.pem", "key": out / "server.key"}
    _refuse_existing(list(files.values()), force=force)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    ca_cert = (x509.CertificateBuilder().subject_name(_name("fedmed CA")).issuer_name(_name("fedmed CA"))
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))
    sans: list[Any] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    nopw = serialization.NoEncryption()
    _write(files["ca_cert"], ca_cert.public_bytes(pem), force=force)
    _write(files["ca_key"], ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, nopw),
           private=True, force=force)
    _write(files["cert"], cert.public_bytes(pem), force=force)
    _write(files["key"], key.private_bytes(pem, serialization.PrivateFormat.PKCS8, nopw),
           private=True, force=force)
    return files


def create_site_key(out: Path, *, site: str, force: bool = False) -> tuple[Path, Path]:
    """An ECDSA (P-384) key pair in OpenSSH format for Flower's node authentication.

    ``site`` becomes the file name, so it must be a plain name (letters, digits, ``_.-``).
    Raises :class:`WouldOverwrite` if ``<site>`` or ``<site>.pub`` exists and not ``force``.
    """
    if not _SITE_NAME.fullmatch(site):
        raise UsageError(f"site name {site!r} must be letters, digits, '_', '.' or '-' "
                         "(it becomes the key's file name)")
    out = Path(out)
    priv, pub = out / site, out / f"{site}.pub"
    _refuse_existing([priv, pub], force=force)
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    _write(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()), private=True, force=force)
    _write(pub, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                              serialization.PublicFormat.OpenSSH) + f" {site}\n".encode(),
           force=force)
    return priv, pub
