"""Hub key material: the Ed25519 batch signing key and the hall CA that gives the broker
its TLS identity (and, when asked, devices their client certificates).

Private keys are written 0600 in folders made 0700, and are never logged: functions here
return paths or key objects, and errors name files, not contents.
"""
from __future__ import annotations

import datetime
import ipaddress
import os

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from hub import PingjiaError

# ECDSA P-256: what ESP32 mbedTLS and OpenSSL both handle fast; RSA would cost the
# device seconds per handshake and Ed25519 certificates are not widely supported in TLS.
_CURVE = ec.SECP256R1
CA_DAYS = 3650
LEAF_DAYS = 3650
# A device's clock may be a little behind the hub's when it first checks the certificate.
_BACKDATE = datetime.timedelta(days=1)


class KeysError(PingjiaError):
    """A key or certificate file that is missing, unreadable or of the wrong kind."""


def _private_dir(folder):
    os.makedirs(folder, mode=0o700, exist_ok=True)


def write_secret(path, data):
    """Write bytes readable by the owner only; atomic so a crash never leaves half a key."""
    _private_dir(os.path.dirname(os.path.abspath(path)))
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def write_public(path, data):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _read(path, what):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise KeysError("%s: no %s (run `pingjia hub init`)" % (path, what))
    except OSError as exc:
        raise KeysError("%s: cannot read %s: %s" % (path, what, exc.strerror))


def _private_pem(key):
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _load_private(path, what):
    try:
        return serialization.load_pem_private_key(_read(path, what), password=None)
    except (ValueError, TypeError):
        raise KeysError("%s: not an unencrypted PEM private key" % path) from None


# -- the hub's batch signing key ------------------------------------------------------------

def generate_signing_key(path, force=False):
    """Create the hub's Ed25519 signing key at `path` (PKCS8 PEM, 0600)."""
    if os.path.exists(path) and not force:
        raise KeysError("%s: signing key already exists (use --force to replace it)" % path)
    key = Ed25519PrivateKey.generate()
    write_secret(path, _private_pem(key))
    return key


def ensure_signing_key(path):
    """The signing key at `path`, created on first use."""
    if os.path.exists(path):
        return load_signing_key(path)
    return generate_signing_key(path)


def load_signing_key(path):
    key = _load_private(path, "signing key")
    if not isinstance(key, Ed25519PrivateKey):
        raise KeysError("%s: not an Ed25519 private key" % path)
    return key


def public_key_pem(key):
    """PEM of the public half of a signing key (what the province registers)."""
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def public_key_hex(key):
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw.hex()


# -- the hall CA -------------------------------------------------------------------------

class HallTLS:
    """Where one hub keeps its TLS material.

    The CA private key sits with the hub's other keys; what mosquitto reads (CA cert,
    server cert and key) sits in the broker's tls/ folder.
    """

    def __init__(self, keys_dir, tls_dir):
        self.ca_key = os.path.join(keys_dir, "hall-ca.key")
        self.ca_cert = os.path.join(tls_dir, "ca.crt")
        self.server_cert = os.path.join(tls_dir, "server.crt")
        self.server_key = os.path.join(tls_dir, "server.key")

    @classmethod
    def for_settings(cls, settings):
        return cls(settings.keys_dir, settings.tls_dir)

    def exists(self):
        return all(os.path.exists(p) for p in
                   (self.ca_key, self.ca_cert, self.server_cert, self.server_key))

    def ca_pem(self):
        return _read(self.ca_cert, "hall CA certificate").decode("ascii")


def _name(common_name, hall_id):
    return x509.Name([
        x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Pingjia hall %s" % hall_id),
        x509.NameAttribute(NameOID.COMMON_NAME, common_name),
    ])


def _validity(builder, days):
    now = datetime.datetime.now(datetime.timezone.utc)
    return builder.not_valid_before(now - _BACKDATE).not_valid_after(now + datetime.timedelta(days=days))


def _ski(public_key):
    return x509.SubjectKeyIdentifier.from_public_key(public_key)


def create_ca(tls, hall_id, force=False):
    """A self-signed hall CA; returns (key, cert)."""
    if os.path.exists(tls.ca_key) and not force:
        raise KeysError("%s: hall CA already exists (use --force to replace it)" % tls.ca_key)
    key = ec.generate_private_key(_CURVE())
    name = _name("Pingjia hall CA %s" % hall_id, hall_id)
    builder = (x509.CertificateBuilder()
               .subject_name(name).issuer_name(name)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(_ski(key.public_key()), critical=False))
    cert = _validity(builder, CA_DAYS).sign(key, hashes.SHA256())
    write_secret(tls.ca_key, _private_pem(key))
    write_public(tls.ca_cert, cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def load_ca(tls):
    key = _load_private(tls.ca_key, "hall CA key")
    try:
        cert = x509.load_pem_x509_certificate(_read(tls.ca_cert, "hall CA certificate"))
    except ValueError:
        raise KeysError("%s: not a PEM certificate" % tls.ca_cert) from None
    return key, cert


def _leaf(ca_key, ca_cert, common_name, hall_id, usage, sans=None):
    key = ec.generate_private_key(_CURVE())
    builder = (x509.CertificateBuilder()
               .subject_name(_name(common_name, hall_id))
               .issuer_name(ca_cert.subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                            key_agreement=True, content_commitment=False,
                                            data_encipherment=False, key_cert_sign=False,
                                            crl_sign=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
               .add_extension(_ski(key.public_key()), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = _validity(builder, LEAF_DAYS).sign(ca_key, hashes.SHA256())
    return key, cert


def _san_entries(hosts):
    entries, seen = [], set()
    for host in hosts:
        if not host or host in seen or host in ("0.0.0.0", "::"):
            continue
        seen.add(host)
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            entries.append(x509.DNSName(host))
    return entries


def server_hosts(settings, extra=()):
    """Names the broker's certificate covers: loopback, the configured host, extras."""
    return ["127.0.0.1", "localhost", settings.broker.host] + list(extra)


def issue_server_cert(tls, hall_id, hosts):
    """Sign a broker certificate for `hosts` (IP addresses and DNS names) with the hall CA."""
    ca_key, ca_cert = load_ca(tls)
    key, cert = _leaf(ca_key, ca_cert, "Pingjia broker %s" % hall_id, hall_id,
                      ExtendedKeyUsageOID.SERVER_AUTH, _san_entries(hosts))
    write_secret(tls.server_key, _private_pem(key))
    write_public(tls.server_cert, cert.public_bytes(serialization.Encoding.PEM))
    return cert


def ensure_hall_tls(settings, extra_hosts=(), force=False):
    """The hall CA and broker certificate for these settings, created when missing.
    With force, both are replaced (devices then need the new CA)."""
    tls = HallTLS.for_settings(settings)
    if force or not os.path.exists(tls.ca_key):
        create_ca(tls, settings.hub.id, force=True)
        issue_server_cert(tls, settings.hub.id, server_hosts(settings, extra_hosts))
    elif not (os.path.exists(tls.server_cert) and os.path.exists(tls.server_key)):
        issue_server_cert(tls, settings.hub.id, server_hosts(settings, extra_hosts))
    return tls


def issue_client_cert(settings, device_id):
    """A client certificate for one device, CN = device id, signed by the hall CA.
    Returns (cert_pem, key_pem) as text; the hub keeps no copy of the device's key."""
    tls = HallTLS.for_settings(settings)
    ca_key, ca_cert = load_ca(tls)
    key, cert = _leaf(ca_key, ca_cert, device_id, settings.hub.id, ExtendedKeyUsageOID.CLIENT_AUTH)
    return (cert.public_bytes(serialization.Encoding.PEM).decode("ascii"),
            _private_pem(key).decode("ascii"))
